"""What a run writes: the environment it ran in, the markdown table, the JSON and the PNG charts."""

from __future__ import annotations

import datetime
import json
import platform
import subprocess
from pathlib import Path

import torch

import rtdetrv2_kernels

from . import call_cost, codebases, deployment, fused, model, peers, training
from .cases import REFERENCE

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _commit() -> str:
    try:
        result = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                                text=True)
        return result.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def environment(threads: int) -> dict:
    info = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                commit=_commit(), torch=torch.__version__, python=platform.python_version(), cpu=_cpu_name(),
                cpu_threads=threads, backends=rtdetrv2_kernels.available_backends())
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "not installed"
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    info.update(peers.versions())
    return info


def _ratio(x) -> str:
    return f"{x:.2f}x" if x else "-"


def summary(rows: list[dict]) -> str:
    """One line per problem and pass: every implementation's median ms, and our fastest backend's speedup
    over the reference and over each peer (the table the README shows)."""
    names = list(dict.fromkeys(r["implementation"] for r in rows))
    ours = [n for n in names if n in rtdetrv2_kernels.BACKENDS and n != REFERENCE]
    others = [n for n in names if n not in ours]
    header = ["shape", "method", "dtype", "device", "pass", *(f"{n} ms" for n in names),
              *(f"ours vs {n}" for n in others)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 5 + "---:|" * (len(header) - 5)]
    groups: dict[tuple, dict] = {}
    for r in rows:
        groups.setdefault((r["shape"], r["method"], r["dtype"], r["device"], r["pass"]), {})[r["implementation"]] = r
    for key, by_name in groups.items():
        best = min((by_name[n]["ms"] for n in ours if n in by_name), default=None)
        cells = [*key, *(f"{by_name[n]['ms']:.3f}" if n in by_name else "-" for n in names),
                 *(_ratio(by_name[n]["ms"] / best) if best and n in by_name else "-" for n in others)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _op_tables(rows: list[dict]) -> list[str]:
    """The op's summary and the table of every measurement."""
    peer_columns = [name for name in peers.NAMES if any(r.get(f"vs {name}") for r in rows)]
    lines = ["", "## Summary", "", "Median ms per call; \"ours\" is our fastest backend on the problem.", "",
             summary(rows), "", "## All measurements", ""]
    lines += ["Median time per call over interleaved rounds; ± is the interquartile range over the median. "
              f"Speedups are the other implementation's time over this one's (vs {REFERENCE}: the PyTorch "
              "reference). Peak memory: allocated at the peak of one forward+backward, beyond its inputs. "
              "x floor: forward time over the time to move its inputs and output once at copy bandwidth.", ""]
    header = ["shape", "method", "dtype", "device", "pass", "implementation", "ms", "±", f"vs {REFERENCE}",
              *(f"vs {name}" for name in peer_columns), "peak MiB", "x floor"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * 6 + "---:|" * (len(header) - 6)]
    for r in rows:
        cells = [r["shape"], r["method"], r["dtype"], r["device"], r["pass"],
                 r["implementation"] + (" (graph)" if r["timing"] == "cuda-graph" else ""),
                 f"{r['ms']:.3f}", f"{100 * r['spread']:.0f}%", _ratio(r[f"vs {REFERENCE}"]),
                 *(_ratio(r.get(f"vs {name}")) for name in peer_columns),
                 f"{r['peak_mib']:.1f}" if r.get("peak_mib") is not None else "-", _ratio(r.get("x floor"))]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(info: dict, rows: list[dict], scaling: list[dict], fused_rows: list[dict] = (),
             call_cost_rows: list[dict] = (), model_rows: list[dict] = (), training_rows: list[dict] = (), deployment_rows: list[dict] = (),
             codebase_rows: list[dict] = (), skipped: dict[str, str] | None = None) -> str:
    """The report; `skipped`: what this run left out (a section's title, or "peer <name>") -> why."""
    lines = ["# rtdetrv2_kernels benchmark", ""]
    lines += [f"- {key}: {value}" for key, value in info.items()]
    if rows:  # `--codebases-only` measures no op shapes
        lines += _op_tables(rows)
    if scaling:
        lines += ["", "## Cost growth (forward+backward, ms)", "",
                  "| sweep | value | implementation | ms |", "|---|---:|---|---:|"]
        lines += [f"| {s['sweep']} | {s['value']} | {s['implementation']} | {s['ms']:.3f} |" for s in scaling]
    if fused_rows:
        lines += ["", fused.markdown(fused_rows)]
    if call_cost_rows:
        lines += ["", call_cost.markdown(call_cost_rows)]
    if model_rows:
        lines += ["", model.markdown(model_rows)]
    if training_rows:
        lines += ["", training.markdown(training_rows)]
    if deployment_rows:
        lines += ["", deployment.markdown(deployment_rows)]
    if codebase_rows:
        lines += ["", codebases.markdown(codebase_rows)]
    if skipped:
        lines += ["", "## Skipped", "", "Parts of the benchmark this run could not do here, and why:", ""]
        lines += [f"- {what}: {reason}" for what, reason in skipped.items()]
    return "\n".join(lines) + "\n"


def write(out: Path, info: dict, rows: list[dict], scaling: list[dict], sections: dict, charts: bool) -> list[Path]:
    """benchmark.md, benchmark.json and the charts; sections: markdown()'s keyword arguments."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "benchmark.md", out / "benchmark.json"]
    written[0].write_text(markdown(info, rows, scaling, **sections))
    written[1].write_text(json.dumps(dict(environment=info, results=rows, scaling=scaling,
                                          fused=sections.get("fused_rows", []),
                                          call_cost=sections.get("call_cost_rows", []), model=sections.get("model_rows", []),
                                          training=sections.get("training_rows", []),
                                          deployment=sections.get("deployment_rows", []),
                                          codebases=sections.get("codebase_rows", []),
                                          skipped=sections.get("skipped", {})),
                                     indent=2))
    if charts:
        written += _charts(out, info, rows, scaling)
    return written


def _charts(out: Path, info: dict, rows: list[dict], scaling: list[dict]) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        print("matplotlib is not installed: no PNG charts (pip install matplotlib)")
        return []
    subtitle = f"{info.get('gpu') or info['cpu']}, torch {info['torch']}, {info['commit']}, {info['date'][:10]}"
    written = []
    plain = FuncFormatter(lambda value, _: f"{value:g}")

    def bars(path: Path, key: str, title: str, ylabel: str, pass_: str, log: bool):
        selected = [r for r in rows if r["pass"] == pass_ and r.get(key) is not None]
        if not selected:
            return
        problems = list(dict.fromkeys((r["shape"], r["method"], r["dtype"], r["device"]) for r in selected))
        names = list(dict.fromkeys(r["implementation"] for r in selected))
        width = 0.8 / len(names)
        fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(problems) * len(names) ** 0.5), 4.5))
        for i, name in enumerate(names):
            values = {(r["shape"], r["method"], r["dtype"], r["device"]): r[key] for r in selected
                      if r["implementation"] == name}
            ax.bar([p + i * width for p in range(len(problems))], [values.get(p, 0) for p in problems], width,
                   label=name)
        ax.set_xticks([p + 0.4 - width / 2 for p in range(len(problems))],
                      ["\n".join(p) for p in problems], fontsize=7)
        if log:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(plain)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}\n{subtitle}", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)

    for pass_ in ("forward", "forward+backward"):
        bars(out / f"speedup_{pass_.replace('+', '_')}.png", f"vs {REFERENCE}",
             f"{pass_}: speedup over the PyTorch reference", "x faster than torch", pass_, log=True)
    bars(out / "peak_memory.png", "peak_mib", "forward+backward: peak memory beyond the inputs", "MiB",
         "forward+backward", log=True)
    if scaling:
        sweeps = list(dict.fromkeys(s["sweep"] for s in scaling))
        fig, axes = plt.subplots(1, len(sweeps), figsize=(5 * len(sweeps), 4), squeeze=False)
        for ax, sweep in zip(axes[0], sweeps):
            points = [s for s in scaling if s["sweep"] == sweep]
            for name in dict.fromkeys(s["implementation"] for s in points):
                mine = [s for s in points if s["implementation"] == name]
                ax.plot([s["value"] for s in mine], [s["ms"] for s in mine], marker="o", label=name)
            ax.set_xscale("log")
            ax.set_yscale("log")
            for axis in (ax.xaxis, ax.yaxis):  # plain numbers on log axes, not powers of ten
                axis.set_major_formatter(plain)
                axis.set_minor_formatter(plain)
            ax.set_xlabel(sweep)
            ax.set_ylabel("ms per forward+backward")
            ax.set_title(points[0]["problem"], fontsize=8)
            ax.legend(fontsize=7)
        fig.suptitle(f"cost growth\n{subtitle}", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "scaling.png", dpi=120)
        plt.close(fig)
        written.append(out / "scaling.png")
    return written
