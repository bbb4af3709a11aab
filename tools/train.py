"""`kvc train-ae`: train the key/value autoencoders of the `ae` codec on a model's caches."""

from __future__ import annotations

import hashlib
import os

import click

from kvcodec.errors import InputError
from kvcodec.eval.models import MODELS
from kvcodec.tools.common import force_option, model_option, progress_bar, quiet_option


@click.command("train-ae")
@click.option("--latent-dim", type=click.IntRange(1, 4096), default=16, show_default=True,
              help="Latent size each key or value vector is coded to.")
@click.option("--shared", is_flag=True, help="One network for all layers, with a learned layer embedding "
                                             "(default: one network per layer).")
@click.option("--hidden", type=click.IntRange(1, 65536), default=128, show_default=True, help="Hidden units.")
@click.option("--texts", default=None,
              help="Comma-separated training texts: names (train-prose, train-code, train-data) or files [all three].")
@click.option("--tokens", type=click.IntRange(16), default=1024, show_default=True,
              help="Tokens of each text (fewer if a text is shorter).")
@click.option("--steps", type=click.IntRange(1), default=1500, show_default=True, help="Optimizer steps.")
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True,
              help="Seed of the networks' initial weights and of the training batches.")
@model_option("Development model whose caches to train on.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True,
              help="Weights (.safetensors); the config goes beside it as .json.")
@force_option
@quiet_option
def train_ae_command(latent_dim, shared, hidden, texts, tokens, steps, seed, model, output, force, quiet):
    """Train autoencoders for a model's keys and values, for `kvc pack -c ae --opt weights=FILE`.

    Caches are captured from training texts disjoint from the evaluation texts; keys and values
    get separate networks. Prints the relative reconstruction error on the training caches and
    the weights' sha256 (what a file packed without embedded weights refers to)."""
    import torch

    from kvcodec.cache import KVCache
    from kvcodec.eval import ae_training, capture
    from kvcodec.eval.texts import shipped_texts, training_texts

    if not output.endswith(".safetensors"):
        raise InputError(f"{output}: the weights file must end in .safetensors")
    config_path = os.path.splitext(output)[0] + ".json"
    for path in (output, config_path):
        if os.path.exists(path) and not force:
            raise InputError(f"{path} exists (use --force to overwrite)")
    names = [t.strip() for t in texts.split(",") if t.strip()] if texts else list(training_texts())
    evaluation = [n for n in names if n in shipped_texts()]
    if evaluation:
        raise InputError(f"{evaluation[0]!r} is an evaluation text; train on others (train-prose, train-code, "
                         "train-data or your own files)")
    caches, hashes = [], {}
    for name in names:
        label, contents = capture.read_text(name)
        ids = capture.tokenize(contents, None, model)[:, :tokens]
        _, past, _ = capture.prefill(ids, model=model)
        caches.append(KVCache.from_hf(past).to(dtype=torch.float32))
        hashes[label] = hashlib.sha256(contents.encode()).hexdigest()
    with progress_bar(steps, "training", quiet) as update:
        report = None if update is None else (lambda step, loss: update(step, f"training, loss {loss:.4f}"))
        ae = ae_training.train(caches, latent_dim, hidden=hidden, shared=shared, steps=steps, seed=seed,
                               model=MODELS[model].title, texts=hashes, progress=report)
    digest = ae.save(output)
    if not quiet:
        errors = [ae_training.relative_error(ae, c) for c in caches]
        key = sum(e["key"] for e in errors) / len(errors)
        value = sum(e["value"] for e in errors) / len(errors)
        click.echo(f"{output}: latent {latent_dim}, {'shared' if shared else 'per-layer'} weights, "
                   f"{os.path.getsize(output) / 2**20:.1f} MiB, sha256 {digest}; relative error on the training "
                   f"caches: keys {key:.3f}, values {value:.3f}", err=True)


@click.command("calibrate")
@model_option("Development model to calibrate.")
@click.option("--tokens", type=click.IntRange(64), default=1024, show_default=True,
              help="Tokens of each training text read (the last 128 score the sensitivities).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Profile file [MODEL-SHA256.safetensors in ~/.cache/kvcodec/profiles, where decoding looks].")
@force_option
@quiet_option
def calibrate_command(model, tokens, output, force, quiet):
    """Measure a model's kvtc profile on the training texts, for `kvc pack -c kvtc --opt profile=FILE`.

    Records each layer's rotary embedding, the transform of its keys and values (principal axes
    weighted by the model's sensitivity to each channel) and each tensor's measured sensitivity.
    Files name the profile by its sha256; decoding finds it in ~/.cache/kvcodec/profiles or the
    folders of KVCODEC_PROFILE_PATH. Takes a minute (SmolLM2) to a few (Gemma-3)."""
    from pathlib import Path

    from kvcodec.artifacts import sha256
    from kvcodec.calibration.fit import calibrate
    from kvcodec.codecs.kvtc import PROFILES
    from kvcodec.files import atomic_output

    if output is not None and not output.endswith(".safetensors"):
        raise InputError(f"{output}: the profile file must end in .safetensors")
    if output is not None and os.path.exists(output) and not force:
        raise InputError(f"{output} exists (use --force to overwrite)")
    with progress_bar(100, "calibrating (%)", quiet) as update:
        data = calibrate(model, tokens=tokens, progress=update).to_bytes()
    digest = sha256(data)
    if output is None:
        PROFILES.folder.mkdir(parents=True, exist_ok=True)
        output = str(PROFILES.folder / f"{model}-{digest[:16]}.safetensors")
    with atomic_output(Path(output), True) as f:
        f.write(data)
    if not quiet:
        click.echo(f"{output}: kvtc profile of {MODELS[model].title}, sha256:{digest}", err=True)
    click.echo(output)
