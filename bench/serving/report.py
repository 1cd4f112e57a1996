"""serving.json, serving.png and serving.md from one results dict (every number in the doc comes from it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.serving.targets import service_sweep

GPU_NAME = "serving-gpu"


def write_json(results: dict[str, Any], path: Path) -> None:
    """Every measurement, as the run produced it."""
    path.write_text(json.dumps(results, indent=1, sort_keys=False) + "\n")


def _f(x: Any, digits: int = 1) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    return str(x)


def _e2e(m: dict[str, Any]) -> float | None:
    best = (m.get("e2e_ceiling") or {}).get("best")
    return best["images_per_s"] if best else None


def write_plot(results: dict[str, Any], out_dir: Path, name: str) -> list[str]:
    """Throughput as a share of the end-to-end ceiling (the encoder's ceiling for results without one) per
    system (each model), and p50 latency against the number of classes; returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = results["models"]
    panels = len(models) + (1 if any("classes" in m for m in models.values()) else 0)
    fig, axes = plt.subplots(1, max(panels, 1), figsize=(5.5 * max(panels, 1), 4))
    axes = list(axes) if panels > 1 else [axes]
    c = str(results["plan"]["target_c"])
    for ax, (label, m) in zip(axes, models.items()):
        e2e = _e2e(m)
        ceiling = e2e or m["ceiling"]["best"]["images_per_s"]
        what = "in-process end-to-end ceiling" if e2e else "in-process encoder ceiling"
        rows = [r for r in _systems(m, c) if r[1]]
        names = [r[0] for r in rows]
        shares = [(r[1]["throughput"] / ceiling) if r[1] else 0.0 for r in rows]
        ax.barh(names[::-1], shares[::-1], color="#4a7ab5")
        ax.axvline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xlabel(f"throughput / {what} ({ceiling:,.{0 if ceiling >= 100 else 2}f} img/s)")
        ax.set_title(f"{label}: concurrency {c}")
    growth = next((m["classes"] for m in models.values() if "classes" in m), None)
    if growth:
        ax = axes[-1]
        xs = sorted(int(k) for k in growth)
        ax.plot(xs, [growth[str(x)]["load"]["1"]["p50_ms"] for x in xs], "o-", label="p50, client")
        ax.plot(xs, [growth[str(x)]["load"]["1"]["p99_ms"] for x in xs], "s--", label="p99, client")
        ax.set_xscale("log")
        ax.set_xlabel("classes in the table")
        ax.set_ylabel("latency at concurrency 1 (ms)")
        ax.set_title("cost of a larger class table")
        ax.legend()
    fig.tight_layout()
    fname = f"{name}.png"
    fig.savefig(out_dir / fname, dpi=110)
    plt.close(fig)
    return [fname]


def _sweeps(m: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The service sweeps of a model, labelled: one process, each other worker count, one process again."""
    first = m["service"]
    out = [(f"service, `--workers {first.get('workers', 1)}`", first)]
    for n, sweep in sorted(m.get("service_workers", {}).items(), key=lambda kv: int(kv[0])):
        if "load" in sweep:
            out.append((f"service, `--workers {n}`", sweep))
    if "service_repeat" in m:
        out.append((f"service, `--workers {m['service_repeat'].get('workers', 1)}` (repeat)", m["service_repeat"]))
    if "service_two_lanes" in m:
        out.append(("service, `--workers 1 --inference-lanes 2`", m["service_two_lanes"]))
    return out


# The single-cell service variants, by their key in a model's results, as the plot and the thread line name them.
_VARIANTS = (
    ("service_batching_off", "service, batching off"),
    ("service_full_decode", "service, --jpeg-draft off"),
    ("service_ort_spinning", "service, --ort-spinning"),
)


def _thread_choices(m: dict[str, Any]) -> list[str]:
    """What each service row ran its image encoder on, as the service reported it at start (`GET /v1/model`);
    nothing for a run recorded before the cells kept it."""
    rows = [*_sweeps(m), *((name, m[key]) for key, name in _VARIANTS if key in m)]
    said = [
        f"{name}: {row['encoder_threads'] or 'onnxruntime default'}" for name, row in rows if "encoder_threads" in row
    ]
    if not said:
        return []
    head = "Image-encoder intra-op threads each service row ran on (`GET /v1/model` at start): "
    return ["", head + "; ".join(said) + "."]


def _systems(m: dict[str, Any], c: str) -> list[tuple[str, dict | None]]:
    rows: list[tuple[str, dict | None]] = [(name, sweep["load"].get(c)) for name, sweep in _sweeps(m)]
    rows += [(name, (m.get(key) or {}).get("load")) for key, name in _VARIANTS]
    rows.append(("hand-written FastAPI + PyTorch", m.get("handwritten")))
    rows += [(name, cell) for name, cell in m.get("peers", {}).items()]
    return rows


def _load_row(name: str, cell: dict | None, ceiling: float, e2e: float | None = None) -> str:
    if not cell:
        return f"| {name} | – | – | – | – | – | – | – | – | – |"
    share = _f(cell["throughput"] / e2e, 3) if e2e else "–"
    return (
        f"| {name} | {cell['concurrency']} | {_f(cell['throughput'])} | {share} | "
        f"{_f(cell['throughput'] / ceiling, 3)} | {_f(cell['p50_ms'])} | {_f(cell['p95_ms'])} | "
        f"{_f(cell['p99_ms'])} | {cell['errors']} | {_f(cell.get('client_cpu_us_per_request'), 0)} |"
    )


def explain_table(explain: dict[str, Any]) -> list[str]:
    """Classify latency with `explain=true` beside without (same server, same images, back to back)."""
    lines = [
        "",
        "### Explanations (`explain=true`) beside plain classification (same server, cache off, back to back)",
        "",
    ]
    if explain.get("note"):
        lines += [explain["note"], ""]
    lines += [
        "| concurrency | plain images/s | plain p50 ms | plain p99 ms | explain images/s | explain p50 ms "
        "| explain p99 ms |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for conc, cell in explain["load"].items():
        a, b = cell["plain"], cell["explain"]
        lines.append(
            f"| {conc} | {_f(a['throughput'])} | {_f(a['p50_ms'], 2)} | {_f(a['p99_ms'], 2)} | "
            f"{_f(b['throughput'])} | {_f(b['p50_ms'], 2)} | {_f(b['p99_ms'], 2)} |"
        )
    lines += [
        "",
        "With `explain=true` each image is scored on its own (branch probabilities, attention weights over the "
        "returned classes' anchors) instead of with its batch; without it the request takes the plain batched path.",
    ]
    return lines


def _model_section(label: str, m: dict[str, Any], c: str) -> list[str]:
    b = m["bundle"]
    ceiling = m["ceiling"]["best"]["images_per_s"]
    e2e = _e2e(m)
    lines = [
        f"## Model `{label}`: {b['arch']}, {b['image_size']} px input, {b['precision']}, "
        f"{b['classes']} trained classes, image encoder {b['image_encoder_bytes'] / 1e6:.1f} MB",
        "",
    ]
    if "max_batch_size" in m:
        lines += [
            f"The service, LitServe and the end-to-end ceiling run with a largest batch of {m['max_batch_size']}, "
            "the encoder ceiling's best batch size measured just before them.",
            "",
        ]
    lines += [
        "### Encoder ceiling: ONNX Runtime in-process on preprocessed tensors",
        "",
        "Measured before and after the HTTP cells; the best point is the ceiling.",
        "",
        "| when | session | batch | images/s | ms per batch | runs |",
        "|---|---|---:|---:|---:|---:|",
    ]
    top = m["ceiling"]["best"]
    for pt in m["ceiling"]["points"]:
        mark = " **(best)**" if pt == top else ""
        lines.append(
            f"| {pt.get('when', '')} | {pt.get('session', 'service options')} | {pt['batch_size']}{mark} | "
            f"{_f(pt['images_per_s'])} | {_f(pt['ms_per_batch'], 2)} | {pt['runs']} |"
        )
    if "e2e_ceiling" in m:
        e2e_top = m["e2e_ceiling"]["best"]
        whens = " and ".join(sorted({pt["when"] for pt in m["e2e_ceiling"]["points"]}, reverse=True))
        counts = " and ".join(str(w) for w in sorted({pt["workers"] for pt in m["e2e_ceiling"]["points"]}))
        lines += [
            "",
            "### End-to-end ceiling: the same JPEGs decoded, preprocessed, encoded and scored in-process, no HTTP",
            "",
            "The service's own decoding, preprocessing, encoder session and head in worker processes on the same "
            f"cores, batched by the service's rule (up to {e2e_top['max_batch_size']} images, leaving when the "
            f"oldest has waited {e2e_top.get('max_wait_ms', 5.0):g} ms) and padded to its buckets (method below). "
            f"Measured {whens} the HTTP cells with {counts} worker processes; the best point "
            f"({e2e_top['workers']} worker{'s' if e2e_top['workers'] > 1 else ''}, {e2e_top['when']}) is the "
            f"ceiling: {e2e_top['images_per_s']:,.1f} images/s, "
            f"{e2e_top['images_per_s'] / ceiling:.3f} of the encoder ceiling.",
            "",
            "| when | workers | decode threads each | encoder threads each | images/s | mean batch | images | "
            "seconds |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for pt in m["e2e_ceiling"]["points"]:
            mark = " **(best)**" if pt == e2e_top else ""
            threads = pt["encoder_threads"] if pt["encoder_threads"] else "default"
            lines.append(
                f"| {pt['when']} | {pt['workers']}{mark} | {pt['decode_threads']} | {threads} | "
                f"{_f(pt['images_per_s'])} | {_f(pt['mean_batch'])} | {pt['images']} | {_f(pt['seconds'])} |"
            )
    lines += [
        "",
        "### Over HTTP (distinct 640×480 JPEGs, closed loop)",
        "",
        "| system | concurrency | images/s | × e2e ceiling | × encoder ceiling | p50 ms | p95 ms | p99 ms | errors "
        "| load generator CPU µs/request |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, sweep in _sweeps(m):
        for conc in sorted(sweep["load"], key=int):
            lines.append(_load_row(name, sweep["load"][conc], ceiling, e2e))
    variants = f"`--workers {m['variant_workers']}`, " if "variant_workers" in m else ""
    lines.append(
        _load_row(
            f"service, {variants}batching off (`--max-batch-size 1`)", m["service_batching_off"]["load"], ceiling, e2e
        )
    )
    if "service_full_decode" in m:
        lines.append(
            _load_row(
                f"service, {variants}`--jpeg-draft off` (JPEGs decoded in full)",
                m["service_full_decode"]["load"],
                ceiling,
                e2e,
            )
        )
    if "service_ort_spinning" in m:
        lines.append(
            _load_row(
                f"service, {variants}`--ort-spinning` (ONNX Runtime's default threading; not ours)",
                m["service_ort_spinning"]["load"],
                ceiling,
                e2e,
            )
        )
    lines.append(_load_row("hand-written FastAPI + PyTorch", m.get("handwritten"), ceiling, e2e))
    for name, cell in m.get("peers", {}).items():
        lines.append(_load_row(f"{name} (own batching, same ONNX model)", cell, ceiling, e2e))
    lines += _thread_choices(m)
    skipped = [(n, v["skipped"]) for n, v in m.get("service_workers", {}).items() if "skipped" in v]
    for n, why in skipped:
        lines += ["", f"`--workers {n}` was not measured: {why}."]
    lines += _workers_section(m)
    lines += _generators_section(m)
    lines += [
        "",
        "### Where the service's time goes (its own histograms, per load cell)",
        "",
        "| cell | decode + preprocess ms/image | queue wait ms | mean batch | encoder + head ms/batch | "
        "ms/image in batch | server request ms (mean) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    profiles = [
        (f"{name.removeprefix('service, ')}, c={k}", sweep["profile"][k])
        for name, sweep in _sweeps(m)
        for k in sorted(sweep["profile"], key=int)
    ]
    profiles.append((f"batching off, c={c}", m["service_batching_off"]["profile"]))
    if "service_full_decode" in m:
        profiles.append((f"`--jpeg-draft off`, c={c}", m["service_full_decode"]["profile"]))
    if "service_ort_spinning" in m:
        profiles.append((f"`--ort-spinning`, c={c}", m["service_ort_spinning"]["profile"]))
    for name, pr in profiles:
        lines.append(
            f"| {name} | {_f(pr.get('decode_preprocess_ms_per_image'), 2)} | {_f(pr.get('queue_wait_ms_mean'), 2)} | "
            f"{_f(pr.get('mean_batch_size'), 1)} | {_f(pr.get('inference_ms_per_batch'), 2)} | "
            f"{_f(pr.get('inference_ms_per_image'), 2)} | {_f(pr.get('request_ms_mean'), 1)} |"
        )
    if "cache" in m:
        cache = m["cache"]
        lines += [
            "",
            f"### Cache hits ({cache['distinct_images']} images sent over and over, in-process cache)",
            "",
            "| concurrency | images/s | client p50 ms | client p99 ms | server p50 ms | server p99 ms | hits "
            "| misses |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for conc, cell in cache["load"].items():
            srv = cache["server"][conc]
            lines.append(
                f"| {conc} | {_f(cell['throughput'])} | {_f(cell['p50_ms'], 2)} | {_f(cell['p99_ms'], 2)} | "
                f"{_f(srv['p50_ms'], 2)} | {_f(srv['p99_ms'], 2)} | {int(srv['hits'])} | {int(srv['misses'])} |"
            )
        lines += [
            "",
            "Server-side percentiles are read from the service's `vlltr_request_duration_seconds` histogram "
            "(buckets 1, 2.5, 5, 10 ms, …), interpolated linearly within a bucket as Prometheus does, so "
            "they are coarse; the target uses the client's p50, which includes the server's time and so "
            "bounds it from above.",
        ]
    if "explain" in m:
        lines += explain_table(m["explain"])
    if "classes" in m:
        growth = m["classes"]
        concs = sorted({k for e in growth.values() for k in e["load"]}, key=int)
        head = (
            "| classes | added | start s | "
            + " | ".join(f"c={k} images/s | c={k} p50 ms | c={k} p99 ms" for k in concs)
            + " |"
        )
        lines += [
            "",
            "### Cost of a larger class table (classes added programmatically)",
            "",
            head,
            "|" + "---:|" * (3 + 3 * len(concs)),
        ]
        for total, e in growth.items():
            cols = " | ".join(
                f"{_f(e['load'][k]['throughput'])} | {_f(e['load'][k]['p50_ms'], 2)} | {_f(e['load'][k]['p99_ms'], 2)}"
                for k in concs
            )
            lines.append(f"| {int(total):,} | {e['added']:,} | {_f(e['start_s'])} | {cols} |")
    if "add_class" in m:
        a = m["add_class"]
        lines += [
            "",
            f"### Adding classes while serving ({a['classes']:,} classes, concurrency {a['concurrency']})",
            "",
            "| run | images/s | p50 ms | p95 ms | p99 ms | errors |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name, key in (
            ("no adds", "without"),
            ("classes added back to back", "with_adds"),
            ("requests overlapping an add", "overlapping_adds"),
        ):
            cell = a.get(key)
            if cell:
                lines.append(
                    f"| {name} | {_f(cell['throughput']) if key != 'overlapping_adds' else '–'} | "
                    f"{_f(cell['p50_ms'])} | {_f(cell['p95_ms'])} | {_f(cell['p99_ms'])} | {cell['errors']} |"
                )
        adds = a["adds"]
        lines += [
            "",
            f"{adds['count']} classes were added during the measured run; one `POST /v1/classes` took "
            f"{_f(adds['p50_ms'])} ms at the median and {_f(adds['max_ms'])} ms at most.",
        ]
    lines.append("")
    return lines


def _workers_section(m: dict[str, Any]) -> list[str]:
    """Each worker count against the single process, with this run's run-to-run noise."""
    noise = m.get("noise")
    if not noise or not noise["per_concurrency"]:
        return []
    counts = [int(k) for k, v in sorted(m.get("service_workers", {}).items(), key=lambda kv: int(kv[0])) if "load" in v]
    e2e = _e2e(m)
    head = "| concurrency | `--workers 1` images/s | repeat | spread |"
    rule = "|---:|---:|---:|---:|"
    for n in counts:
        head += f" `--workers {n}` images/s | / single-process mean |"
        rule += "---:|---:|"
    if e2e:
        head += " best / e2e ceiling |"
        rule += "---:|"
    lines = [
        "",
        "### Front-end processes against the single process",
        "",
        "The single-process sweep ran first and again last, the others in between; the spread of its two "
        "measurements at one concurrency, |a − b| / mean(a, b), is this run's run-to-run noise, and the largest "
        f"spread ({_f(noise['max_spread'], 3)}) is the tolerance of the `workers_no_slower` target: no cell may "
        "fall below the single process's mean by more than that share (throughput at a fixed concurrency in a "
        "closed loop is the inverse of the mean latency, so this covers latency too).",
        "",
        head,
        rule,
    ]
    for c, v in sorted(noise["per_concurrency"].items(), key=lambda kv: int(kv[0])):
        row = f"| {c} | {_f(v['first'])} | {_f(v['repeat'])} | {_f(v['spread'], 3)} |"
        best = max(v["first"], v["repeat"])
        for n in counts:
            cell = m["service_workers"][str(n)]["load"].get(c)
            if cell:
                row += f" {_f(cell['throughput'])} | {_f(cell['throughput'] / v['mean'], 3)} |"
                best = max(best, cell["throughput"])
            else:
                row += " – | – |"
        if e2e:
            row += f" {_f(best / e2e, 3)} |"
        lines.append(row)
    return lines


def _generators_section(m: dict[str, Any]) -> list[str]:
    """wrk against Locust on the same server and concurrency."""
    gen = m.get("load_generators")
    if not gen:
        return []
    lines = [
        "",
        f"### Load generators on the same server (`--workers 1`, concurrency {gen['concurrency']})",
        "",
        "CPU is the load generator's own (user + system, read from the kernel; wrk's whole process, Locust's "
        "over the measured window). On a shared machine every CPU second the client takes is one the server "
        "does not get.",
        "",
        "| load generator | images/s | p50 ms | p99 ms | CPU s | CPU µs/request | share of one core |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in ("wrk", "locust"):
        cell = gen.get(name)
        if not cell:
            continue
        cpu = cell.get("client_cpu_s")
        share = cpu / cell["duration_s"] if cpu is not None and cell["duration_s"] else None
        lines.append(
            f"| {cell.get('generator') or name} | {_f(cell['throughput'])} | {_f(cell['p50_ms'])} | "
            f"{_f(cell['p99_ms'])} | {_f(cpu, 2)} | {_f(cell.get('client_cpu_us_per_request'), 0)} | "
            f"{_f(100 * share if share is not None else None, 1)} % |"
        )
    return lines


def generator_cost_line(results: dict[str, Any]) -> str:
    """One sentence: what the load generator cost in this run (and what Locust costs on the same cell)."""
    cells = [
        cell
        for m in results["models"].values()
        for cell in _all_cells(m)
        if cell.get("client_cpu_us_per_request") is not None and str(cell.get("generator", "")).startswith("wrk")
    ]
    text = ""
    if cells:
        costs = sorted(cell["client_cpu_us_per_request"] for cell in cells)
        share = max(cell["client_cpu_s"] / cell["duration_s"] for cell in cells if cell["duration_s"])
        text = (
            f"wrk used {costs[0]:,.0f}–{costs[-1]:,.0f} µs of CPU per request over the {len(costs)} wrk cells "
            f"(median {costs[len(costs) // 2]:,.0f} µs; at most {100 * share:.1f} % of one core)"
        )
    gen = next((m["load_generators"] for m in results["models"].values() if "load_generators" in m), None)
    if gen and gen.get("wrk") and gen.get("locust"):
        w, lo = gen["wrk"], gen["locust"]
        text += (
            f"; on the same server at concurrency {gen['concurrency']}, wrk took "
            f"{_f(w.get('client_cpu_us_per_request'), 0)} µs per request and Locust "
            f"{_f(lo.get('client_cpu_us_per_request'), 0)} µs (the server answered {_f(w['throughput'])} and "
            f"{_f(lo['throughput'])} images/s under them)"
        )
    return text


def _all_cells(m: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for _, sweep in _sweeps(m):
        out += sweep["load"].values()
    for key in ("service_batching_off", "service_full_decode", "service_ort_spinning"):
        if key in m:
            out.append(m[key]["load"])
    for cell in (m.get("handwritten"), *m.get("peers", {}).values()):
        if cell:
            out.append(cell)
    if "cache" in m:
        out += m["cache"]["load"].values()
    for entry in (m.get("classes") or {}).values():
        out += entry["load"].values()
    add = m.get("add_class") or {}
    out += [add[k] for k in ("without", "with_adds") if k in add]
    return out


def _findings(results: dict[str, Any], small: str | None) -> list[str]:
    """One paragraph per missed target, built from this run's own numbers (profile included)."""
    targets = results["targets"]
    models = results["models"]
    c = str(results["plan"]["target_c"])
    cores = f"{results['machine']['cores']} cores"
    out: list[str] = []
    if small and small in models:
        m = models[small]
        sweep, workers = service_sweep(m)
        prof = sweep["profile"].get(c, {})
        svc = sweep["load"].get(c, {})
        full = m.get("service_full_decode")
        decode = prof.get("decode_preprocess_ms_per_image")
        throughput_missed = [
            k
            for k in ("small_service_vs_best_peer", "small_service_vs_handwritten", "small_service_vs_ceiling")
            if targets.get(k, {}).get("met") is False
        ]
        if throughput_missed and decode and svc:
            text = (
                f"- **Small model throughput** ({', '.join(f'`{k}`' for k in throughput_missed)} missed): at "
                f"concurrency {c} the service (`--workers {workers}`) answered {svc['throughput']:,.1f} images/s. "
                "Its profile puts "
                f"{decode:.2f} ms per image in JPEG decoding and preprocessing (CPU time in the decode pool, "
                f"640×480 → {m['bundle']['image_size']} px) against {prof.get('inference_ms_per_image', 0):.2f} ms "
                f"per image in the encoder and head (mean batch {prof.get('mean_batch_size', 0):.1f}); the "
                f"event loop's HTTP, multipart and response work comes on top. Every system here decodes the same "
                f"JPEGs, and the {cores} are shared with the load generator, so decoding bounds everyone: the "
                f"encoder's ceiling ({m['ceiling']['best']['images_per_s']:,.0f} images/s on tensors) is out of "
                f"reach of any server that must decode JPEGs on these cores."
            )
            if full and m["bundle"].get("jpeg_draft"):
                fprof = full["profile"]
                text += (
                    f" The bundle decodes large JPEGs at reduced size (trained and evaluated that way); "
                    f"decoding them in full (`--jpeg-draft off`) costs "
                    f"{fprof.get('decode_preprocess_ms_per_image', 0):.2f} ms per image and gives "
                    f"{full['load']['throughput']:,.1f} images/s."
                )
            out.append(text)
        t = targets.get("cache_hit_p50_ms_server")
        if t and t["met"] is False:
            out.append(
                f"- **Cache hits** (`cache_hit_p50_ms_server` {t['value']:.2f} ms > {t['goal']} ms, measured by "
                f"the client): a hit skips decoding and the encoder but still goes through HTTP parsing, "
                f"hashing the upload and the head; the server's own histogram puts its p50 at "
                f"{_f(m['cache']['server']['1']['p50_ms'], 2)} ms."
            )
        t = targets.get("latency_50k_vs_1k_classes")
        if t and t["met"] is False:
            g = m["classes"]
            out.append(
                f"- **Class growth** (`latency_50k_vs_1k_classes` {t['value']:.2f} > {t['goal']}): p50 at "
                f"concurrency 1 was {g['1000']['load']['1']['p50_ms']:.2f} ms with 1,000 classes and "
                f"{g['50000']['load']['1']['p50_ms']:.2f} ms with 50,000 (server side "
                f"{_f(g['1000']['server_p50_ms'].get('1'), 2)} and {_f(g['50000']['server_p50_ms'].get('1'), 2)} ms). "
                f"Past 4,096 added classes only each image's 256 nearest added classes are scored exactly; "
                f"what still grows with the table is ranking every added class in the 128-dimension sketch "
                f"(one matrix-vector product over 50,000 rows), the calibrated softmax over every class and "
                f"the top-k selection, on one core beside the request handling."
            )
        t = targets.get("add_class_p99_ratio")
        if t and t["met"] is False:
            a = m["add_class"]
            out.append(
                f"- **Adding classes under load** (`add_class_p99_ratio` {t['value']:.2f} > {t['goal']}): p99 "
                f"went from {a['without']['p99_ms']:.1f} ms to {a['with_adds']['p99_ms']:.1f} ms while "
                f"{a['adds']['count']} classes were added back to back (median add {a['adds']['p50_ms']:.0f} ms): "
                f"encoding the descriptions and the name prompts (on the text thread, at a lower priority than "
                f"requests), appending the class to the class store (one fsynced line) and writing its rows into "
                f"the table's spare rows run on the same {cores} as the requests."
            )
    t = targets.get("realistic_service_vs_ceiling")
    realistic = next((k for k, v in models.items() if "cache" not in v), None)
    if t and t["met"] is False and realistic:
        r = models[realistic]
        prof = service_sweep(r)[0]["profile"].get(c, {})
        top = r["ceiling"]["best"]
        peers = [
            f"{name} {cell['throughput']:.2f}"
            for name, cell in [("hand-written", r.get("handwritten")), *r.get("peers", {}).items()]
            if cell
        ]
        phases = {}
        for pt in r["ceiling"]["points"]:
            when = pt.get("when", "")
            phases[when] = max(phases.get(when, 0.0), pt["images_per_s"])
        svc = service_sweep(r)[0]["load"].get(c, {}).get("throughput", 0.0)
        spread = ""
        if "before" in phases and "after" in phases:
            spread = (
                f" The same session ran at {phases['before']:.2f} images/s at its best before the HTTP cells "
                f"and {phases['after']:.2f} after them, a {max(phases.values()) / min(phases.values()):.1f}x "
                f"swing from other work on the machine; against the ceiling measured just before it, the "
                f"service's ratio is {svc / phases['before']:.2f}."
            )
        out.append(
            f"- **Realistic model** (`realistic_service_vs_ceiling` {t['value']:.3f} < {t['goal']}): the "
            f"ceiling is {top['images_per_s']:.2f} images/s ({1000 / top['images_per_s']:.2f} ms per image at "
            f"batch {top['batch_size']}, {top.get('when', '')}).{spread} At concurrency {c} the service's batches "
            f"(mean {prof.get('mean_batch_size', 0):.1f} images) took "
            f"{prof.get('inference_ms_per_image', 0):.2f} ms per image in the encoder and head, and "
            f"decoding took {prof.get('decode_preprocess_ms_per_image', 0):.1f} ms per image on the same "
            f"{cores}, beside the load generator. Images/s of the others in the same run: "
            f"{', '.join(peers)}. "
            + (
                f"On {cores} shared with other work, the encoder's speed varies from one minute to the next, "
                "so this ratio carries that noise as much as any cost of serving."
                if results["provider"] == "cpu"
                else "On the GPU the encoder is not what limits the service: decoding the JPEGs on the CPU "
                "is, as for every server in the table."
            )
        )
    for role, label in (("small", small), ("realistic", realistic)):
        if label and label in models:
            out += _e2e_findings(results, role, label)
    if not out:
        return []
    return ["## Why targets were missed (from this run's profile)", "", *out, ""]


def _e2e_findings(results: dict[str, Any], role: str, model: str) -> list[str]:
    """Paragraphs for a missed end-to-end target and a missed no-slower target of one model."""
    targets = results["targets"]
    c = str(results["plan"]["target_c"])
    m = results["models"][model]
    out = []
    t = targets.get(f"{role}_service_vs_e2e_ceiling")
    sweep, workers = service_sweep(m)
    svc = sweep["load"].get(c)
    if t and t["met"] is False and svc:
        e2e = m["e2e_ceiling"]["best"]
        prof = sweep["profile"].get(c, {})
        cpu = svc.get("client_cpu_us_per_request")
        out.append(
            f"- **{model} against its end-to-end ceiling** (`{role}_service_vs_e2e_ceiling` {t['value']:.3f} < "
            f"{t['goal']}): the service with `--workers {workers}` answered {svc['throughput']:,.1f} images/s at "
            f"concurrency {c}; the same JPEGs decoded, preprocessed, encoded and scored in-process on the same cores "
            f"reach {e2e['images_per_s']:,.1f} images/s ({e2e['workers']} worker"
            f"{'s' if e2e['workers'] > 1 else ''}, mean batch {e2e['mean_batch']:.1f}). The service's profile puts "
            f"{_f(prof.get('decode_preprocess_ms_per_image'), 2)} ms per image in decoding and preprocessing and "
            f"{_f(prof.get('inference_ms_per_image'), 2)} ms per image in the encoder and head (mean batch "
            f"{_f(prof.get('mean_batch_size'), 1)}, queue wait {_f(prof.get('queue_wait_ms_mean'), 2)} ms); the "
            f"rest of the gap is HTTP, multipart parsing and the hand-offs between threads"
            + (f", beside the load generator's {cpu:,.0f} µs of CPU per request." if cpu else ".")
        )
    t = targets.get(f"{role}_workers_no_slower")
    if t and t["met"] is False:
        noise = m["noise"]
        rows = []
        for n in sorted(int(k) for k, v in m.get("service_workers", {}).items() if "load" in v):
            for conc, cell in sorted(m["service_workers"][str(n)]["load"].items(), key=lambda kv: int(kv[0])):
                ref = noise["per_concurrency"].get(conc)
                if ref and cell["throughput"] < ref["mean"] * (1 - noise["max_spread"]):
                    rows.append(
                        f"`--workers {n}` at c={conc} answered {cell['throughput']:,.1f} images/s against "
                        f"{ref['first']:,.1f} and {ref['repeat']:,.1f} for the single process"
                    )
        out.append(
            f"- **More front-end processes were slower** (`{role}_workers_no_slower` {t['value']:.3f} < "
            f"{t['goal']}, the goal being 1 − this run's noise {noise['max_spread']:.3f}): " + "; ".join(rows) + "."
        )
    return out


def _targets_section(targets: dict[str, Any]) -> list[str]:
    lines = ["## Targets", "", "| target | value | goal | met |", "|---|---:|---:|:---:|"]
    for name, t in targets.items():
        met = "–" if t["met"] is None else ("yes" if t["met"] else "**no**")
        lines.append(f"| {t['what']} (`{name}`) | {_f(t['value'], 3)} | {t['comparison']} {t['goal']} | {met} |")
    lines.append("")
    return lines


def write_markdown(results: dict[str, Any], path: Path, plots: list[str], notes: list[str] | None = None) -> None:
    """The report: machine, command, targets, one section per model, the GPU status, and `notes`."""
    mach = results["machine"]
    c = str(results["plan"]["target_c"])
    lines = [
        "# Serving benchmark",
        "",
        "The service against its ceilings (the same JPEGs decoded, preprocessed, encoded and scored in-process; "
        "the encoder alone on tensors) and its peers (a hand-written FastAPI + PyTorch server, LitServe), on the "
        "same bundles, machine and load generator, in one run. Written by "
        f"`{results['command'].strip()}`; every number below is in `{path.with_suffix('.json').name}`.",
        "",
        "## Machine",
        "",
        f"- CPU: {mach['cpu']}, {mach['cores']} cores visible, {mach['memory_gib']} GiB memory; {mach['os']}",
        f"- Python {mach['python']}; " + ", ".join(f"{k} {v}" for k, v in mach["packages"].items()),
        f"- provider: {results['provider']}; mode: {results['mode']}; run took {results['elapsed_s']:.0f} s",
        f"- load average (1/5/15 min) at start {results['load_average_start']}, at end "
        f"{results.get('load_average_end', 'not recorded (stopped early)')}: the load generator, the server and "
        "any other work on the machine share the same cores, so compare ratios within this run rather than "
        "absolute numbers across runs",
        f"- load: {results['load_generator']}; warm-up / measured seconds per cell: "
        + ", ".join(
            f"{k} {v['warmup_s']:g} / {v['duration_s']:g}"
            for k, v in results["plan"].items()
            if isinstance(v, dict) and "warmup_s" in v
        ),
    ]
    cost = generator_cost_line(results)
    if cost:
        lines.append(f"- load generator cost: {cost}")
    lines.append("")
    lines += _targets_section(results["targets"])
    lines += _findings(results, next((k for k, v in results["models"].items() if "cache" in v), None))
    for notes_line in notes or []:
        lines.append(notes_line)
    for fname in plots:
        lines += [f"![throughput and latency]({fname})", ""]
    for label, m in results["models"].items():
        lines += _model_section(label, m, c)
    lines += _gpu_section(path.parent)
    lines += _method_section(str(results.get("load_generator", "")).startswith("wrk"))
    path.write_text("\n".join(lines) + "\n")


def _gpu_section(out_dir: Path) -> list[str]:
    gpu = out_dir / f"{GPU_NAME}.json"
    lines = [
        "## GPU",
        "",
        "`python -m bench.serving.gpu` runs the same tables on one NVIDIA GPU (fp32 and fp16 "
        "bundles, ONNX Runtime's CUDA provider when `onnxruntime-gpu` is installed, otherwise the encoder "
        "through PyTorch on the GPU, which the results then say) in about 6 minutes and writes "
        f"`{GPU_NAME}.json` and `{GPU_NAME}.md` with the card's name. On a GPU machine without network access, "
        "`bench/serving/gpu_lease.sh` installs the serving stack and onnxruntime-gpu from carried wheels, "
        "checks that a CUDA session really runs, then runs it (the script's header says how).",
        "",
    ]
    if gpu.is_file():
        data = json.loads(gpu.read_text())
        stopped = " (stopped at its time limit; the page lists what was measured)" if data.get("partial") else ""
        lines += [f"Results from {data.get('gpu', {}).get('name', 'a GPU')}{stopped}: see `{GPU_NAME}.md`.", ""]
    else:
        lines += ["**Not run yet**: no GPU was available where this report was produced.", ""]
    return lines


def _method_section(wrk: bool = True) -> list[str]:
    load = (
        "- Each system runs as its own server process on 127.0.0.1; the load generator runs on the same machine. "
        "It is wrk (the system package: C, one thread, one connection per concurrent client, closed loop: each "
        "connection sends its next image when the previous answer arrives), with a LuaJIT script "
        "(`bench/serving/wrk_classify.lua`) that sends request bodies built beforehand (multipart, or JSON for "
        "LitServe), round-robin through the images, and writes wrk's own summary (answers, errors by kind, "
        "latency percentiles from its histogram) in its `done()` hook. Every arm, peers included, gets the "
        "same load generator. A cell is a warm-up run, a drain (one request answered once the backlog is gone), "
        "the measured run and a drain; throughput is the answers (status < 400) per second of the measured run, "
        "latency is wrk's (from writing the request to the last byte of the answer); errors count answers with "
        "status ≥ 400, connection errors and timeouts (60 s). The table of classes added under load keeps "
        "per-request records (start, latency, status): wrk then runs one thread per connection, in both of "
        "that table's runs. What wrk itself costs is read from the kernel (`getrusage` of the wrk process: user "
        "+ system CPU); one cell runs Locust (`FastHttpUser`, one process, the previous load generator) against "
        "the same server for comparison, its CPU counted over its measured window only."
        if wrk
        else "- Each system runs as its own server process on 127.0.0.1; the load generator (Locust, one process, "
        "`FastHttpUser`, closed loop: each user sends its next image when the previous answer arrives) runs on "
        "the same machine. Throughput counts answers completed in the measured window after the warm-up; "
        "latency is measured by the client."
    )
    return [
        "## Commands",
        "",
        "```bash",
        "apt-get install wrk                       # the load generator (Debian/Ubuntu package; C, scripted in LuaJIT)",
        "pip install -e '.[train,cpu,bench]'       # LitServe, and Locust for the load-generator comparison",
        "python -m bench.serving                   # this report: both models, every table (about 25 min on 2 cores)",
        "python -m bench.serving --quick           # the demo model only, short cells (development)",
        "python -m bench.serving --report-only     # rewrite serving.md/.png from serving.json",
        "python -m bench.serving.gpu               # the GPU tables (serving-gpu.md/.json), with the `gpu` extra",
        "python -m bench.serving.gpu --render-only # rewrite serving-gpu.md/.png from serving-gpu.json",
        "```",
        "",
        "Bundles, images, request bodies, logs and every load cell's raw output (wrk's summary; per-request "
        "records where a table needs them) stay under `~/.cache/vlltr/bench-serving` (`--work`).",
        "",
        "## What the service does for speed",
        "",
        "- Decoding and preprocessing run in a thread pool with one thread per core (`--preprocess-threads`); "
        "Pillow and numpy release the GIL there, so images decode in parallel with each other, with the "
        "event loop and with the encoder.",
        "- Inference lanes form batches across requests: a batch leaves when full, at once when no "
        "other image is being decoded (no idle wait at low load), and otherwise when its oldest image has "
        "waited `--max-wait-ms`. Batches are padded to warmed power-of-two shapes. One lane runs one batch "
        "at a time on every core; `--inference-lanes 2` runs two at once on half the cores each (its sweep "
        "above).",
        "- A bundle trained with `data.jpeg_draft` (the demo) lets libjpeg decode large JPEGs at 1/2-1/8 "
        "scale; training evaluated the same pixels, so this costs no parity (`--jpeg-draft off` row above).",
        "- Past 4,096 added classes only each image's nearest 256 added classes are scored exactly "
        "(`--head-shortlist`, docs/bundle.md), so latency stops growing with the class table.",
        "- ONNX Runtime's intra-op threads do not spin between runs (`--ort-spinning` turns it back on; the "
        "table above measures both), and numpy's BLAS uses one thread for the head (`--head-threads`).",
        "- On CPU the image encoder keeps one intra-op thread unless onnxruntime's default threads run a lone "
        "image faster, timed when the service starts (`vlltr.model.runtime.encoder_threads`; the ceilings make "
        "the same choice): a small encoder loses more to waking threads than it gains from them.",
        "- A cache hit on a small class table is scored on the event loop instead of through the batcher; "
        "the request path has no thread-pool hop for its dependencies, and long-lived start-up objects are "
        "frozen out of the garbage collector.",
        "",
        "## Method",
        "",
        load,
        "- Images: distinct photo-like 640×480 JPEGs (quality 90, about 65 kB each); each client starts at its "
        "own offset. The service runs with its cache off (`--cache-size 0`) except in the cache table, so every "
        "request decodes and runs the encoder, as it does for the peers.",
        "- Encoder ceiling: the bundle's image encoder session, created exactly as the service creates it (and "
        "with ONNX Runtime's defaults), run on preprocessed float32 tensors at each batch size; the best batch "
        "size is the ceiling and the largest batch of the batching servers.",
        "- End-to-end ceiling (`bench/serving/e2e.py`): the load cells' JPEGs, held in memory, classified by "
        "worker processes running the service's own pieces: `decode_image` (the service's pixel limit and the "
        "bundle's JPEG draft rule) and `preprocess_image` (the bundle's spec) on a decode thread pool that "
        "runs ahead of the encoder, then `ImageEncoder` (the service's session options), the head "
        "(`probabilities` with the service's shortlist rule and one BLAS thread) and the top-5. Batches follow "
        "the service's rule while images are being decoded (they always are here): a batch leaves when it holds "
        "the service's largest batch or when its oldest image has waited `--max-wait-ms` (the default), and is "
        "padded to the service's power-of-two buckets. One worker runs one batch at a time (a decode "
        "thread per core, ONNX Runtime's default intra-op threads: the service's defaults); "
        "two workers split the cores (cores / 2 decode and intra-op threads each, as the service's "
        "`--inference-lanes 2` does within one process) and run "
        "over the same window, their rates summed. Both are measured before and after the HTTP cells; the best "
        "is the ceiling, and its table says which.",
        "- Front-end processes: the service runs with `--workers 1` first, then each other worker count, then "
        "`--workers 1` again (a checkout whose `vlltr serve` has no `--workers` runs one process without the "
        "flag and records the others as not measured). The two single-process sweeps give the run-to-run noise "
        "(largest |a − b| / mean(a, b) over the concurrencies); no multi-worker cell may fall below the "
        "single-process mean by more than it. The targets judge the largest worker count measured. The other "
        "service tables run with `--variant-workers` front-ends (default 1).",
        "- Hand-written server: FastAPI `def` endpoint, `UploadFile`, the training evaluation transform, "
        "the PyTorch model on one image per request under `torch.inference_mode()`, uvicorn with one worker.",
        "- LitServe: the bundle's ONNX encoder and head in a `LitAPI` with `max_batch_size` as the service's, "
        "`batch_timeout=0.005`, one worker; decoding in `decode_request` as its documentation shows; "
        "requests are JSON with the JPEG in base64 (LitServe's image recipe; its multipart path fails to "
        "pickle the form into its worker in this version).",
        "- Class growth: the class-store file is written with the extra classes (and the bundle's derived data, "
        "so nothing is encoded at start) before the service starts (anchor features are trained anchors plus "
        "noise); adding classes under load uses `POST /v1/classes` "
        "back to back (0.2 s apart) during the whole measured window.",
        "- Server-side stage times come from the service's Prometheus histograms scraped before and after each cell.",
        "",
    ]
