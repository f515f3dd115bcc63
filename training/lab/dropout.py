"""Section 2, `dropout`: a custom training loop, MC dropout, and why training=True is wrong for it.

1. Train the project's residual CNN (BatchNorm backbone, `MCDropout` head) in a hand-written
   loop that passes `training=True` in the step (dropout on) and `training=False` in evaluation
   (deterministic, as `predict`).
2. MC dropout done right, asked for explicitly: T=100 dropout masks on the head while BatchNorm
   stays in inference mode (`SplitClassifier.mc_logits`; in plain Keras `backbone(x,
   training=False)` then `head(features, training=True)`), summarised as the mean and variance of the
   softmax, predictive entropy and mutual information, on clean test images and on shifted /
   out-of-distribution inputs (Gaussian noise, blur, random-noise images).
3. MC dropout done wrong: `model(x, training=True)` also switches BatchNorm to batch statistics.
   Measured: (a) one image's prediction depends on which other images share its batch; (b) every
   such call updates the moving statistics, which changes the model's later clean predictions.
"""

from __future__ import annotations

import numpy as np

from training.lab.context import advance_epochs, lab_network, seed_everything, tape_training
from training.lab.resume import run_epochs

DROPOUT = 0.3
MC_SAMPLES = 100
BATCH = 128
LEARNING_RATE = 2e-3


# --- 1. training ------------------------------------------------------------------------------

def train(model, data, *, epochs: int, seed: int, log, checkpoint=None) -> None:
    """Custom loop: `training=True` in the step, `training=False` for evaluation."""
    import tensorflow as tf

    from models.inference import SplitClassifier

    # training=True in the step: BN uses batch statistics and updates its moving statistics,
    # and MCDropout drops units (it only does when training=True)
    ds, train_step, optimizer = tape_training(model, data, seed=seed, batch_size=BATCH,
                                              learning_rate=LEARNING_RATE, training=True)

    @tf.function
    def predict(x):
        # BN: moving statistics, nothing updated; MCDropout off: the deterministic prediction
        return model(x, training=False)

    split = SplitClassifier(model)

    def one_epoch(epoch):
        losses = [float(train_step(x, y)) for x, y in ds]
        det = sum(int(np.sum(predict(tf.constant(data.x_test[i:i + 500])).numpy().argmax(1)
                             == data.y_test[i:i + 500]))
                  for i in range(0, len(data.x_test), 500)) / len(data.x_test)
        # one explicit MC sample: backbone(training=False), head(training=True)
        one_sample = split.mc_logits_keras(data.x_test, 1)[0]
        return epoch, float(np.mean(losses)), det, float(np.mean(one_sample.argmax(1) == data.y_test))

    run_epochs(checkpoint, model, optimizer, epochs, one_epoch, log, advance=advance_epochs(ds))


# --- 2. shifted and OOD inputs ----------------------------------------------------------------

def shifted_sets(x: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    f = x.astype(np.float32)
    to_u8 = lambda a: np.clip(np.round(a), 0, 255).astype(np.uint8)  # noqa: E731
    return {
        "clean": x,
        "gaussian_noise_s25": to_u8(f + rng.normal(0, 25, f.shape)),
        "gaussian_noise_s50": to_u8(f + rng.normal(0, 50, f.shape)),
        "blur_sigma1.5": to_u8(gaussian_filter(f, sigma=(0, 1.5, 1.5, 0))),
        "random_noise_images": rng.integers(0, 256, x.shape, dtype=np.uint8),
    }


def mc_uncertainty(classifier, sets: dict[str, np.ndarray], labels: np.ndarray, seed: int):
    from models.calibration.uncertainty import summarize_mc_samples

    out, per_image = {}, {}
    for name, images in sets.items():
        samples = classifier.mc_logits(images, MC_SAMPLES, seed=seed)       # [T, N, K]
        s = summarize_mc_samples(samples)
        pred = s.mean.argmax(axis=1)
        var_pred = s.variance[np.arange(len(pred)), pred]                  # var of the top prob
        deterministic = classifier.logits(images).argmax(axis=1)            # dropout as identity
        ood = name == "random_noise_images"
        out[name] = {
            "n": int(len(images)),
            "accuracy_of_mc_mean": None if ood else float(np.mean(pred == labels)),
            "accuracy_deterministic": None if ood else float(np.mean(deterministic == labels)),
            "mean_top_probability": float(s.mean.max(axis=1).mean()),
            "mean_variance_top_class": float(var_pred.mean()),
            "mean_variance_summed_over_classes": float(s.variance.sum(axis=1).mean()),
            "mean_predictive_entropy": float(s.predictive_entropy.mean()),
            "mean_expected_entropy": float(s.expected_entropy.mean()),
            "mean_mutual_information": float(s.mutual_information.mean()),
            "median_mutual_information": float(np.median(s.mutual_information)),
        }
        per_image[name] = (s.mutual_information, var_pred)
    return out, per_image


# --- 3. the wrong way: training=True --------------------------------------------------------------

def _bn_state(model):
    return [w.numpy() for w in model.non_trainable_weights if "moving" in w.path]


def _set_bn_state(model, state):
    for w, value in zip([w for w in model.non_trainable_weights if "moving" in w.path], state):
        w.assign(value)


def batch_composition_effect(classifier, x_probe, y_probe, noise_images):
    """Deterministic head on backbone(training=True) features: alone vs in a clean / noisy batch."""
    import tensorflow as tf

    from models.calibration import softmax

    model = classifier.model
    saved = _bn_state(model)

    backbone_train_mode = tf.function(lambda x: classifier.backbone(x, training=True),
                                      reduce_retracing=True)

    def probs_train_mode(batch):
        feats = backbone_train_mode(tf.constant(batch)).numpy()
        return softmax(classifier.head_logits(feats))

    inference = softmax(classifier.logits(x_probe))
    alone = np.concatenate([probs_train_mode(x_probe[i:i + 1]) for i in range(len(x_probe))])
    clean_batch = probs_train_mode(x_probe)
    in_noise = np.concatenate([probs_train_mode(np.concatenate([x_probe[i:i + 1], noise_images]))[:1]
                               for i in range(len(x_probe))])
    _set_bn_state(model, saved)   # these calls moved the statistics; part (b) measures that

    def compare(p):
        return {"accuracy": float(np.mean(p.argmax(1) == y_probe)),
                "agreement_with_inference_argmax": float(np.mean(p.argmax(1) == inference.argmax(1))),
                "mean_total_variation_to_inference": float(0.5 * np.abs(p - inference).sum(1).mean())}

    return {
        "n_probe": int(len(x_probe)),
        "inference_mode": compare(inference),
        "train_mode_alone_batch_of_1": compare(alone),
        "train_mode_in_clean_batch": compare(clean_batch),
        f"train_mode_with_{len(noise_images)}_noise_images": compare(in_noise),
        "alone_vs_clean_batch_mean_total_variation": float(0.5 * np.abs(alone - clean_batch).sum(1).mean()),
        "alone_vs_clean_batch_argmax_agreement": float(np.mean(alone.argmax(1) == clean_batch.argmax(1))),
    }


def moving_stat_drift(classifier, data, sets: dict[str, np.ndarray], n_calls: int):
    """`n_calls` x model(x, training=True) as 'MC samples' on a batch: drift and clean accuracy."""
    import tensorflow as tf

    from training.lab.context import compiled_call

    model = classifier.model
    wrong_mc_sample = compiled_call(model, training=True)    # what people write for MC dropout
    saved = _bn_state(model)
    before = float(np.mean(classifier.logits(data.x_test).argmax(1) == data.y_test))
    results = {"calls": n_calls, "clean_test_accuracy_before": before}
    for name in ("clean", "random_noise_images"):
        batch = tf.constant(sets[name][:100])
        for _ in range(n_calls):
            wrong_mc_sample(batch)
        after_state = _bn_state(model)
        rel = [float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))
               for a, b in zip(after_state, saved)]        # per moving_mean / moving_variance
        acc = float(np.mean(classifier.logits(data.x_test).argmax(1) == data.y_test))
        results[f"after_{n_calls}_calls_on_{name}"] = {
            "clean_test_accuracy_after": acc,
            "max_relative_change_of_moving_stats": max(rel),
            "median_relative_change_of_moving_stats": float(np.median(rel)),
        }
        _set_bn_state(model, saved)
    restored = float(np.mean(classifier.logits(data.x_test).argmax(1) == data.y_test))
    results["clean_test_accuracy_after_restoring_stats"] = restored
    return results


# --- the section ---------------------------------------------------------------------------------

def run(ctx, report) -> None:
    from models.inference import SplitClassifier

    data = ctx.cifar(report, train_full=20000, test_full=2000)
    epochs = ctx.pick("epochs", quick=1, full=4)
    width = ctx.pick("width", quick=4, full=8)
    n_eval = ctx.setting("n_uncertainty_images", quick=200, full=1000)
    n_probe = ctx.setting("n_batch_composition_probes", quick=10, full=100)

    seed_everything(ctx.seed)
    model, cfg = lab_network(width, data.num_classes, dropout=DROPOUT)
    curve = {"epoch": [], "train_loss": [], "test_accuracy": [],
             "test_accuracy_one_mc_sample": []}

    def log(epoch, loss, acc, one_sample):
        curve["epoch"].append(epoch + 1)
        curve["train_loss"].append(loss)
        curve["test_accuracy"].append(acc)
        curve["test_accuracy_one_mc_sample"].append(one_sample)
        print(f"[dropout] epoch {epoch + 1}: loss {loss:.4f} test acc {acc:.4f} "
              f"(one MC-dropout sample: {one_sample:.4f})", flush=True)

    train(model, data, epochs=epochs, seed=ctx.seed, log=log, checkpoint=ctx.loop_checkpoint(report, "model"))
    classifier = SplitClassifier(model)

    x_eval, y_eval = data.x_test[:n_eval], data.y_test[:n_eval]
    sets = shifted_sets(x_eval, ctx.seed)
    uncertainty, per_image = mc_uncertainty(classifier, sets, y_eval, ctx.seed)
    composition = batch_composition_effect(classifier, x_eval[:n_probe], y_eval[:n_probe],
                                           sets["random_noise_images"][:99])
    drift = moving_stat_drift(classifier, data, sets, n_calls=MC_SAMPLES)

    trained = None
    if ctx.artifact:
        # The lab's own model is small and briefly trained; a fully trained artifact shows
        # whether epistemic uncertainty rises off-distribution once the model has learnt more.
        from models.artifact import load_artifact
        trained_classifier = SplitClassifier(load_artifact(ctx.artifact).model)
        trained, _ = mc_uncertainty(trained_classifier, sets, y_eval, ctx.seed)

    report.figures = {
        "settings": {"dropout": DROPOUT, "mc_samples": MC_SAMPLES, "width": width, "epochs": epochs,
                     "batch_size": BATCH, "adam_lr": LEARNING_RATE, "bn_momentum": cfg.bn_momentum},
        "training_curve": curve,
        "mc_dropout_uncertainty": uncertainty,
        "mc_dropout_uncertainty_trained_artifact": (
            None if trained is None else {"artifact": ctx.artifact, "sets": trained}),
        "training_true_batch_composition": composition,
        "training_true_moving_stat_updates": drift,
    }
    _plot(report, per_image, uncertainty)
    rows = _uncertainty_rows(uncertainty)
    trained_lines = []
    if trained is not None:
        trained_lines = [
            "",
            f"The same sets through the trained artifact `{ctx.artifact}` (its own MC-dropout "
            f"head, T={MC_SAMPLES}, softmax at T=1):",
            "",
            "| input set | accuracy (MC mean) | mean top prob | var(top prob) | predictive entropy | "
            "mutual information | MI / clean MI |",
            "| --- | --- | --- | --- | --- | --- | --- |",
            *_uncertainty_rows(trained),
            "",
            *_uncertainty_verdict(trained),
        ]
    noisy_key = [k for k in composition if k.startswith("train_mode_with_")][0]
    noise_drift = drift[f"after_{MC_SAMPLES}_calls_on_random_noise_images"]
    clean_drift = drift[f"after_{MC_SAMPLES}_calls_on_clean"]
    report.summary = [
        "## Dropout and MC dropout",
        "",
        f"Residual CNN width {width}, MCDropout({DROPOUT}) head, {epochs} epoch(s) in a custom loop "
        f"(final test accuracy {curve['test_accuracy'][-1]:.4f} for the deterministic `model(x, "
        f"training=False)`, as `predict`; {curve['test_accuracy_one_mc_sample'][-1]:.4f} for one "
        f"MC-dropout sample, `head(features, training=True)` on `backbone(x, training=False)`). "
        f"MC dropout, asked for explicitly: T={MC_SAMPLES} masks on the head, BatchNorm in inference "
        f"mode, the first {n_eval} test images per set.",
        "",
        "| input set | accuracy (MC mean) | mean top prob | var(top prob) | predictive entropy | "
        "mutual information | MI / clean MI |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
        *_uncertainty_verdict(uncertainty),
        *trained_lines,
        "",
        "### Why `model(x, training=True)` is the wrong way to sample",
        "",
        f"(a) Batch composition ({composition['n_probe']} test images, deterministic head): in training "
        f"mode an image alone vs in a batch of clean images agrees on the class for "
        f"{composition['alone_vs_clean_batch_argmax_agreement']:.0%} of images (mean total variation "
        f"{composition['alone_vs_clean_batch_mean_total_variation']:.3f}); accuracy alone "
        f"{composition['train_mode_alone_batch_of_1']['accuracy']:.3f}, in a clean batch "
        f"{composition['train_mode_in_clean_batch']['accuracy']:.3f}, with 99 noise images "
        f"{composition[noisy_key]['accuracy']:.3f}, vs inference mode "
        f"{composition['inference_mode']['accuracy']:.3f}.",
        "",
        f"(b) Moving statistics: {MC_SAMPLES} training=True calls on 100 random-noise images change "
        f"each BN moving mean/variance by a median {noise_drift['median_relative_change_of_moving_stats']:.0%} "
        f"(relative L2; max {noise_drift['max_relative_change_of_moving_stats']:.0%}) and the clean test "
        f"accuracy in inference mode goes {drift['clean_test_accuracy_before']:.4f} -> "
        f"{noise_drift['clean_test_accuracy_after']:.4f}; on 100 clean test images: median "
        f"{clean_drift['median_relative_change_of_moving_stats']:.0%}, accuracy -> "
        f"{clean_drift['clean_test_accuracy_after']:.4f}. (Statistics restored afterwards.)",
    ]


def _uncertainty_rows(uncertainty) -> list[str]:
    """Markdown table rows, one per input set, with MI relative to the clean set."""
    clean = uncertainty["clean"]
    return [f"| {n} | {'-' if u['accuracy_of_mc_mean'] is None else format(u['accuracy_of_mc_mean'], '.4f')} | "
            f"{u['mean_top_probability']:.3f} | {u['mean_variance_top_class']:.5f} | "
            f"{u['mean_predictive_entropy']:.3f} | {u['mean_mutual_information']:.5f} | "
            f"{u['mean_mutual_information'] / max(clean['mean_mutual_information'], 1e-12):.2f} |"
            for n, u in uncertainty.items()]


def _uncertainty_verdict(uncertainty) -> list[str]:
    """Say in words which uncertainty measures rose over the clean images, set by set."""
    clean = uncertainty["clean"]
    lines = []
    for key, label in (("mean_mutual_information", "mutual information"),
                       ("mean_variance_top_class", "variance of the top-class probability"),
                       ("mean_predictive_entropy", "predictive entropy")):
        higher = [n for n, u in uncertainty.items() if n != "clean" and u[key] > clean[key]]
        lower = [n for n, u in uncertainty.items() if n != "clean" and u[key] <= clean[key]]
        lines.append(f"- {label} vs clean: higher on {', '.join(higher) or 'none'}; "
                     f"not higher on {', '.join(lower) or 'none'}.")
    det = clean["accuracy_deterministic"]
    lines.append(f"- clean accuracy: deterministic head {det:.4f}, mean of the {MC_SAMPLES} MC softmaxes "
                 f"{clean['accuracy_of_mc_mean']:.4f}.")
    return lines


def _plot(report, per_image, uncertainty) -> None:
    names = list(per_image)
    fig, axes = report.figure(ncols=3, size=(5.5, 4.2))
    axes[0, 0].boxplot([per_image[n][0] for n in names], showfliers=False)
    axes[0, 0].set_title("mutual information per image (nats)")
    axes[0, 1].boxplot([per_image[n][1] for n in names], showfliers=False)
    axes[0, 1].set_title("variance of the top-class probability")
    for ax in axes[0, :2]:
        ax.set_xticks(range(1, len(names) + 1), names, rotation=30, ha="right", fontsize="small")
    clean_mi = max(uncertainty["clean"]["mean_mutual_information"], 1e-12)
    ratios = [uncertainty[n]["mean_mutual_information"] / clean_mi for n in names]
    axes[0, 2].bar(range(len(names)), ratios, color="tab:orange")
    axes[0, 2].axhline(1.0, color="black", linestyle=":")
    axes[0, 2].set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize="small")
    axes[0, 2].set_title("mean mutual information / clean")
    report.png("mc_dropout_uncertainty", fig)
