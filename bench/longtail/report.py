"""Aggregate seeds, compute the acceptance targets from the measured numbers, and write JSON, Markdown and a plot."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from bench.longtail.metrics import mean_std

SPLIT_KEYS = ("overall", "many", "medium", "few")
# Shapes-LT's few-shot classes split by what their training images show (absent for other data).
SUBSET_KEYS = ("few_colour", "few_black_and_white")
# The image-only baselines, with and without the post-hoc logit adjustment fitted on the selection images.
IMAGE_ONLY_ARMS = (
    "image_ce",
    "image_bs",
    "image_ce_posthoc_la",
    "image_bs_posthoc_la",
    "image_crt",
    "image_crt_posthoc_la",
)
ARM_LABELS = {
    "zero_shot": "Zero-shot (pretrained CLIP, class-name prompts)",
    "image_ce": "Image-only, cross-entropy (image tower fine-tuned)",
    "image_bs": "Image-only, Balanced Softmax (image tower fine-tuned)",
    "image_ce_posthoc_la": "Image-only, cross-entropy + post-hoc logit adjustment (τ on the selection images)",
    "image_bs_posthoc_la": "Image-only, Balanced Softmax + post-hoc logit adjustment (τ on the selection images)",
    "image_crt": "Image-only, cRT (cross-entropy tower frozen, classifier re-trained on balanced batches)",
    "image_crt_posthoc_la": "Image-only, cRT + post-hoc logit adjustment (τ on the selection images)",
    "lift_style": "LIFT-style: classifier initialised from the class-name prompts, trained with the tower, LA loss",
    "vlltr_faithful": "VL-LTR as published (stage 1 + AnSS + LGR, CE, α=0.2)",
    "vlltr_faithful_vision_branch": "  ↳ its vision (MLP) branch alone",
    "vlltr_faithful_language_branch": "  ↳ its language (anchor) branch alone",
    "text_recommended": "**Recommended: the recipe, as `vlltr train` runs it (stage 1 + AnSS + LGR, LA loss, α=0.1)**",
    "control_shuffled": "Control: recommended, descriptions shuffled across classes",
    "control_distractors": "Control: recommended, distractor sentences only",
    "control_text_shuffled": "Control: recommended, whole class text (names and descriptions) shuffled",
}
ANSS_GOAL = 5.0  # "clearly beats": at least this many points of precision


def aggregate(per_seed: dict[int, dict]) -> dict[str, Any]:
    """Per-arm mean and std over seeds for every split, plus AnSS and added-class summaries."""
    seeds = sorted(per_seed)
    arms: dict[str, Any] = {}
    for arm in per_seed[seeds[0]]["arms"]:
        entry: dict[str, Any] = {"per_seed": {str(s): per_seed[s]["arms"][arm] for s in seeds}, "mean": {}, "std": {}}
        for k in (*SPLIT_KEYS, *(k for k in SUBSET_KEYS if k in per_seed[seeds[0]]["arms"][arm])):
            m, sd = mean_std([per_seed[s]["arms"][arm][k] for s in seeds])
            entry["mean"][k], entry["std"][k] = round(m, 3), round(sd, 3)
        arms[arm] = entry
    out: dict[str, Any] = {"arms": arms}
    for section in ("anss", "added"):
        if section not in per_seed[seeds[0]]:
            continue
        flat = _numeric_leaves(per_seed[seeds[0]][section])
        summary = {}
        for path in flat:
            vals = [_get(per_seed[s][section], path) for s in seeds]
            m, sd = mean_std(vals)
            summary[".".join(path)] = {"mean": round(m, 3), "std": round(sd, 3)}
        out[section] = {"per_seed": {str(s): per_seed[s][section] for s in seeds}, "summary": summary}
    out["timings_s"] = {str(s): per_seed[s]["timings_s"] for s in seeds}
    out["groups"] = per_seed[seeds[0]]["groups"]
    return out


def _numeric_leaves(d: dict, prefix: tuple = ()) -> list[tuple]:
    leaves = []
    for k, v in d.items():
        if isinstance(v, dict):
            leaves += _numeric_leaves(v, prefix + (k,))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            leaves.append(prefix + (k,))
    return leaves


def _get(d: dict, path: tuple) -> Any:
    for k in path:
        d = d[k]
    return d


def _target(value: float, goal: float, met: bool, rule: str) -> dict[str, Any]:
    return {"value": round(float(value), 3), "goal": round(float(goal), 3), "met": bool(met), "rule": rule}


def compute_targets(agg: dict[str, Any], other_dataset: dict[str, Any] | None = None) -> dict[str, Any]:
    """Each acceptance point as `{value, goal, met, rule}`, computed from the aggregated measurements."""
    arms = agg["arms"]
    rec = arms["text_recommended"]
    # Runs written before the post-hoc adjusted baselines existed have the two plain ones only.
    image_only = [a for a in IMAGE_ONLY_ARMS if a in arms]
    best_img = max(image_only, key=lambda a: arms[a]["mean"]["few"])
    best_img_overall = max(arms[a]["mean"]["overall"] for a in image_only)
    gain = rec["mean"]["few"] - arms[best_img]["mean"]["few"]
    noise = 2.0 * max(rec["std"]["few"], arms[best_img]["std"]["few"])
    targets: dict[str, Any] = {
        "few_shot_gain_over_best_image_only": _target(
            gain,
            noise,
            gain > noise,
            f"recommended few-shot minus best image-only few-shot ({best_img}) must exceed twice the larger seed "
            "std of the two",
        ),
        "overall_cost_vs_best_image_only": _target(
            best_img_overall - rec["mean"]["overall"],
            2.0,
            best_img_overall - rec["mean"]["overall"] <= 2.0,
            "best image-only overall minus recommended overall must be at most 2 points",
        ),
        "shuffled_text_few_shot_drop": _target(
            rec["mean"]["few"] - arms["control_shuffled"]["mean"]["few"],
            5.0,
            rec["mean"]["few"] - arms["control_shuffled"]["mean"]["few"] >= 5.0,
            "recommended few-shot minus the shuffled-text control's few-shot must be at least 5 points",
        ),
    }
    if "anss" in agg:
        s = agg["anss"]["summary"]
        p, b, t = s["anss_precision"]["mean"], s["base_rate"]["mean"], s["text_only_precision"]["mean"]
        targets["anss_precision_over_base_rate"] = _target(
            p - b, ANSS_GOAL, p - b >= ANSS_GOAL, f"AnSS precision minus the distractor base rate, >= {ANSS_GOAL}"
        )
        targets["anss_precision_over_text_only_rule"] = _target(
            p - t,
            ANSS_GOAL,
            p - t >= ANSS_GOAL,
            f"AnSS precision minus the text-only (centroid) rule's precision, >= {ANSS_GOAL}",
        )
    if "added" in agg:
        s = agg["added"]["summary"]
        alone = s["added_alone"]["mean"]
        among = s["calibrated.added_among_all"]["mean"]
        cost = s["calibrated.trained_cost"]["mean"]
        targets["added_classes_alone_accuracy"] = _target(
            alone, 80.0, alone >= 80.0, "held-out classes scored among themselves, >= 80%"
        )
        targets["added_classes_among_all_accuracy"] = _target(
            among, 40.0, among >= 40.0, "held-out classes scored among all classes with the pseudo-new γ, >= 40%"
        )
        targets["trained_cost_of_adding_classes"] = _target(
            cost,
            2.0,
            cost <= 2.0 and among >= 40.0,
            "trained-class accuracy lost by adding the held-out classes, <= 2 points, counted as met only together "
            "with >= 40% added-class accuracy among all classes (a cost is meaningless when nothing is added)",
        )
    if other_dataset is not None:
        o = other_dataset
        met, total = int(o.get("targets_met", 0)), int(o.get("targets_total", 0))
        targets["second_dataset_targets"] = _target(
            float(met),
            float(total),
            bool(o.get("complete")) and total > 0 and met == total,
            f"{o.get('name')} ({o.get('path')}), a complete run, meets its own targets; value = how many it meets "
            f"of {total}" + (f" (missed: {', '.join(o.get('missed', []))})" if o.get("missed") else ""),
        )
    return targets


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write the benchmark JSON (NaN written as null)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(payload), indent=1) + "\n")


def _clean(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def write_plot(path: Path, agg: dict[str, Any], title: str) -> None:
    """Grouped bars: every arm's overall / many / medium / few accuracy with seed-std error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [a for a in ARM_LABELS if a in agg["arms"] and "branch" not in a]
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / len(arms)
    x = np.arange(len(SPLIT_KEYS))
    for i, arm in enumerate(arms):
        # An empty shot group has no mean (NaN in memory, null once written to JSON): no bar.
        m = [math.nan if (v := agg["arms"][arm]["mean"][k]) is None else v for k in SPLIT_KEYS]
        sd = [_spread(agg["arms"][arm]["std"][k]) for k in SPLIT_KEYS]
        ax.bar(
            x + (i - (len(arms) - 1) / 2) * width, m, width, yerr=sd, capsize=2, label=ARM_LABELS[arm].replace("*", "")
        )
    ax.set_xticks(x, SPLIT_KEYS)
    ax.set_ylabel("top-1 accuracy (%), mean ± std over seeds")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _missing(x: float | None) -> bool:
    # What has no value (an empty shot group's mean) is NaN in memory and null once written to JSON.
    return x is None or math.isnan(x)


def _spread(std: float | None) -> float:
    """A seed std for an error bar, 0 where there is none."""
    return 0.0 if _missing(std) else float(std)  # type: ignore[arg-type]


def _fmt(entry: dict[str, Any], k: str, *, spread: bool = True) -> str:
    """`mean ± std` (just the mean without `spread`, as for one seed, whose std says nothing)."""
    mean, std = entry["mean"][k], entry["std"][k]
    if _missing(mean):
        return "—"
    return f"{mean:.1f}" if _missing(std) or not spread else f"{mean:.1f} ± {std:.1f}"


def _name_style(style: str | None) -> str:
    if style == "epithet":
        return (
            '; class names are epithets ("velmor triangle"): the shape is in the name, the colour and '
            "pattern only in the descriptions"
        )
    if style == "attributes":
        return '; class names say every attribute ("striped red triangle")'
    return ""


def _pretrain_line(pretrain: dict[str, Any]) -> str:
    if not pretrain.get("per_seed_builds"):
        return f"Pretrained starting point: `{pretrain['file']}` ({pretrain['summary']})."
    each = "; ".join(
        f"seed {s}: `{b['file']}` (pretraining seed {b['pretrain_seed']})" for s, b in pretrain["builds"].items()
    )
    return f"Pretrained starting points, one build per training seed ({pretrain['summary']}): {each}."


def _sessions_line(sessions: dict[str, Any] | None) -> list[str]:
    if not sessions:
        return []
    g = sessions["classes_only_in_black_and_white"]
    return [
        f"Training images come in sessions of {sessions['size']}, each in black and white with probability "
        f"{sessions['monochrome_prob']:.2f}; val and test are in colour. Trained classes seen in training only "
        f"in black and white, whose colour only their descriptions give: {g['many']} many / {g['medium']} "
        f"medium / {g['few']} few.",
        "",
    ]


def _subset_table(agg: dict[str, Any]) -> list[str]:
    arms = [a for a in ARM_LABELS if a in agg["arms"] and all(k in agg["arms"][a]["mean"] for k in SUBSET_KEYS)]
    if not arms:
        return []
    lines = [
        "",
        "Few-shot classes by what their training images show (test images are in colour):",
        "",
        "| arm | few-shot, trained on colour images | few-shot, trained only in black and white |",
        "|---|---|---|",
    ]
    for arm in arms:
        lines.append(f"| {ARM_LABELS[arm]} | " + " | ".join(_fmt(agg["arms"][arm], k) for k in SUBSET_KEYS) + " |")
    return lines


def _protocol_lines(protocol: dict[str, Any] | None) -> list[str]:
    """What every arm trains and selects on, and whether this draw was used to design the recipe."""
    if not protocol:
        return []
    draw = protocol.get("data_seed_role", "")
    return [
        f"Protocol: {protocol['rule']} ({protocol['images']['fit']} training and {protocol['images']['select']} "
        f"selection images).{' ' + draw if draw else ''}",
        "",
    ]


# The arms an other-draw table shows: the best baselines, the published recipe, the recommended one and its control.
DRAW_ARMS = (
    "image_bs",
    "image_bs_posthoc_la",
    "image_crt_posthoc_la",
    "lift_style",
    "vlltr_faithful",
    "text_recommended",
    "control_shuffled",
)


def _draw_lines(label: str, draw: dict[str, Any]) -> list[str]:
    """Another draw's run of the benchmark (its own JSON) as a section of this page: how it was run, its main
    arms on every split, and which of its own targets it meets."""
    agg = draw["results"]
    mono = (draw.get("training_sessions") or {}).get("monochrome_prob", 0.0)
    targets = draw.get("targets", {})
    missed = sorted(k for k, t in targets.items() if not t.get("met"))
    cost = draw.get("from_scratch_min")
    lines = [
        f"### {label}",
        "",
        f"`{draw['command']}`: seeds {draw['seeds']}, data seed {draw['data_seed']}, imbalance {draw['imbalance']}, "
        + (f"training shoots in black and white with probability {mono:.2f}" if mono else "every image in colour")
        + f"; wall time {draw['wall_time_min']:.1f} min"
        + (f" ({cost:.1f} from scratch)" if cost is not None else "")
        + f" on {draw['machine']}.",
        "",
    ]
    if draw.get("protocol", {}).get("data_seed_role"):
        lines += [draw["protocol"]["data_seed_role"], ""]
    keys = [*SPLIT_KEYS, *(k for k in SUBSET_KEYS if k in agg["arms"]["text_recommended"]["mean"])]
    heads = {"few_colour": "few, trained on colour", "few_black_and_white": "few, trained only in black and white"}
    lines += [
        "| arm | " + " | ".join(heads.get(k, k) for k in keys) + " |",
        "|---|" + "---|" * len(keys),
    ]
    spread = len(draw["seeds"]) > 1
    for arm in DRAW_ARMS:
        if arm in agg["arms"]:
            cells = " | ".join(_fmt(agg["arms"][arm], k, spread=spread) for k in keys)
            lines.append(f"| {ARM_LABELS[arm]} | {cells} |")
    lines += [
        "",
        f"Its own targets: {len(targets) - len(missed)} of {len(targets)} met"
        + (f" (missed: {', '.join(missed)})." if missed else "."),
        "",
    ]
    return lines


def write_markdown(path: Path, payload: dict[str, Any], notes: list[str]) -> None:
    """The human-readable benchmark page: table, targets with their margins, plot, command, seeds."""
    agg, targets = payload["results"], payload["targets"]
    lines = [
        f"# {payload['dataset']}: does class text help the tail?",
        "",
        f"Generated by `{payload['command']}` (seeds {payload['seeds']}, data seed {payload['data_seed']}, "
        f"imbalance {payload['imbalance']}{', QUICK smoke scale: not a result' if payload['quick'] else ''}). "
        f"Wall time {payload['wall_time_min']:.1f} min on {payload['machine']}"
        + (
            f"; from scratch (every pretraining build and arm as recorded when it was trained, whether this "
            f"call trained it or found it cached) {payload['from_scratch_min']:.1f} min."
            if payload.get("from_scratch_min") is not None
            else "."
        ),
        "",
        *(
            [f"**Only seeds {payload['seeds']} of the requested {payload['seeds_requested']} completed.**", ""]
            if payload.get("seeds_requested") and payload["seeds"] != payload["seeds_requested"]
            else []
        ),
        f"Classes: {payload['num_trained']} trained ({agg['groups']['many']} many / {agg['groups']['medium']} "
        f"medium / {agg['groups']['few']} few, thresholds {payload['shot_rule']}), {payload['num_heldout']} "
        f"held out (text only){_name_style(payload.get('name_style'))}. Test sets are balanced; every number "
        "is mean per-class top-1 (%) on test, mean ± sample std over the seeds.",
        "",
        *_sessions_line(payload.get("training_sessions")),
        *_protocol_lines(payload.get("protocol")),
        "| arm | overall | many | medium | few |",
        "|---|---|---|---|---|",
    ]
    for arm, label in ARM_LABELS.items():
        if arm in agg["arms"]:
            e = agg["arms"][arm]
            lines.append(f"| {label} | " + " | ".join(_fmt(e, k) for k in SPLIT_KEYS) + " |")
    lines += _subset_table(agg)
    lines += [
        "",
        f"![per-split accuracy]({payload['plot']})",
        "",
        "## Acceptance targets (computed from the runs above)",
        "",
        "| target | value | goal | met | rule |",
        "|---|---|---|---|---|",
    ]
    for name, t in targets.items():
        lines.append(
            f"| {name} | {t['value']:.2f} | {t['goal']:.2f} | {'yes' if t['met'] else '**no**'} | {t['rule']} |"
        )
    if "anss" in agg:
        s = agg["anss"]["summary"]
        lines += [
            "",
            "## Anchor choice (trained classes, real text)",
            "",
            f"- AnSS precision (chosen anchors that truly describe their class): "
            f"{s['anss_precision']['mean']:.1f} ± {s['anss_precision']['std']:.1f} %",
            f"- Distractor base rate (share of descriptive sentences; random choice): {s['base_rate']['mean']:.1f} %",
            f"- Text-only rule (centroid of the class's sentence embeddings): "
            f"{s['text_only_precision']['mean']:.1f} ± {s['text_only_precision']['std']:.1f} %",
        ]
        if "name_rule_precision" in s:
            lines.append(
                f"- Image-free name rule (close to the class-name prompts, far from every other class's "
                f"anchors; the rule the service uses to add classes by text): "
                f"{s['name_rule_precision']['mean']:.1f} ± {s['name_rule_precision']['std']:.1f} %"
            )
        if "prompt_anchors_per_class" in s:
            lines.append(
                f"- Anchors AnSS takes from the name prompts (of M per class, the pool holding both): "
                f"{s['prompt_anchors_per_class']['mean']:.1f} ± {s['prompt_anchors_per_class']['std']:.1f}"
            )
    if "added" in agg:
        s = agg["added"]["summary"]

        def ms(key: str) -> str:
            return f"{s[key]['mean']:.1f} ± {s[key]['std']:.1f}"

        lines += [
            "",
            "## Classes added by text alone (held-out classes, scored through `vlltr.model.runtime.head`)",
            "",
            f"- Image-free anchor rule precision on the added classes: {ms('image_free_precision')} % "
            f"(base rate {s['base_rate']['mean']:.1f} %"
            + (f"; centroid rule {ms('centroid_rule_precision')} %)" if "centroid_rule_precision" in s else ")"),
            f"- Accuracy among the added classes alone: {ms('added_alone')} %",
            f"- Trained classes before adding: {ms('trained_before')} %",
            "",
            "| calibration | trained after | added among all | harmonic mean | trained cost |",
            "|---|---|---|---|---|",
        ]
        rows = {
            "published": "published fusion (added classes: language branch only, γ = 0)",
            "uncalibrated": "standardised vision stand-in, γ = 0",
            "calibrated": "standardised vision stand-in, γ from pseudo-new trained classes",
            "oracle_within_2_points": "diagnostic, not a method: best γ for the held-out test labels within "
            "a 2-point cost",
        }
        for label, text in rows.items():
            if label + ".trained_after" not in s:
                continue
            lines.append(
                f"| {text} | "
                f"{ms(label + '.trained_after')} | {ms(label + '.added_among_all')} | "
                f"{ms(label + '.harmonic_mean')} | {ms(label + '.trained_cost')} |"
            )
        gammas = [agg["added"]["per_seed"][k]["gamma"] for k in agg["added"]["per_seed"]]
        lines.append(
            f"\nChosen γ per seed: {gammas}; rule: {next(iter(agg['added']['per_seed'].values()))['gamma_rule']}."
        )
    lines += [
        "",
        "## How it was run",
        "",
        "```",
        payload["command"],
        "```",
        "",
        _pretrain_line(payload["pretrain"]),
        "",
    ]
    draws = payload.get("other_draws") or []
    if draws:
        lines += ["## Other draws", "", "The same command on other draws of the data, each its own run and JSON.", ""]
        for entry in draws:
            draw_json = path.parent / entry["path"]
            lines += _draw_lines(entry["label"], json.loads(draw_json.read_text()))
    if payload.get("findings"):
        lines += (
            ["## Findings (why the targets are met or missed)", ""] + [f"- {f}" for f in payload["findings"]] + [""]
        )
    lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    path.write_text("\n".join(lines))


def aggregate_ablation(per_seed: dict[int, dict], recipe: str, ablated: str) -> dict[str, Any]:
    """`aggregate` of an ablation's two arms, plus the paired difference ablated − recipe per seed (the same
    build, data and seed on both sides) with its mean and std over seeds."""
    out = aggregate(per_seed)
    seeds = sorted(per_seed)
    keys = out["arms"][recipe]["mean"].keys()
    diff: dict[str, Any] = {"per_seed": {}, "mean": {}, "std": {}}
    for s in seeds:
        a, r = per_seed[s]["arms"][ablated], per_seed[s]["arms"][recipe]
        diff["per_seed"][str(s)] = {k: round(a[k] - r[k], 3) for k in keys}
    for k in keys:
        m, sd = mean_std([diff["per_seed"][str(s)][k] for s in seeds])
        diff["mean"][k], diff["std"][k] = round(m, 3), round(sd, 3)
    out["difference"] = diff
    return out


def write_ablation_markdown(path: Path, payload: dict[str, Any]) -> None:
    """The ablation's page: the recipe beside the recipe with the overrides, and their paired difference."""
    agg, recipe, ablated = payload["results"], payload["recipe_arm"], payload["ablated_arm"]
    keys = list(agg["arms"][recipe]["mean"])
    heads = {"few_colour": "few, trained on colour", "few_black_and_white": "few, trained only in black and white"}
    spread = len(payload["seeds"]) > 1
    overrides = ", ".join(f"`{o}`" for o in payload["overrides"])
    cost = payload.get("from_scratch_min")
    lines = [
        f"# {payload['dataset']}: the recommended recipe with {overrides}",
        "",
        f"Generated by `{payload['command']}` (seeds {payload['seeds']}, data seed {payload['data_seed']}). Wall "
        f"time {payload['wall_time_min']:.1f} min"
        + (f" ({cost:.1f} from scratch: both arms as trained, and the pretraining builds)" if cost is not None else "")
        + f" on {payload['machine']}.",
        "",
        f"Both arms are `vlltr train` runs of `{payload['recipe']}` from the same pretrained build, data and seed; "
        f"the second adds {overrides} to the recipe (stage 1 included). Accuracy as served (calibrated), mean "
        "per-class top-1 (%) on test" + (", mean ± sample std over the seeds." if spread else "."),
        "",
        "| arm | " + " | ".join(heads.get(k, k) for k in keys) + " | training (min) |",
        "|---|" + "---|" * (len(keys) + 1),
    ]
    for arm, label in ((recipe, "Recommended recipe"), (ablated, f"Recipe with {overrides}")):
        cells = " | ".join(_fmt(agg["arms"][arm], k, spread=spread) for k in keys)
        minutes = [t[arm] / 60 for t in agg["timings_s"].values()]
        lines.append(f"| {label} | {cells} | {sum(minutes) / len(minutes):.1f} |")
    cells = " | ".join(_fmt(agg["difference"], k, spread=spread) for k in keys)
    lines += [f"| Difference (with − without, paired per seed) | {cells} | |", ""]
    lines += ["Per seed (difference with − without):", ""]
    for s, d in agg["difference"]["per_seed"].items():
        lines.append(f"- seed {s}: " + ", ".join(f"{heads.get(k, k)} {d[k]:+.1f}" for k in keys))
    path.write_text("\n".join(lines) + "\n")
