"""The `cogfun` command line (click); the repo's top-level cli.py runs it as a script
(`accelerate launch cli.py train ...`), `python -m cogfun.cli` as a module.

Options are derived from the settings declared in cogfun/config.py; torch and the model
libraries are imported inside the command bodies so that `--help` answers instantly.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from cogfun.config import (ExportLoraConfig, InspectConfig, PrecomputeConfig, SampleConfig, TrainConfig,
                           build_config, click_options)


def _user_errors():
    """Exceptions that are the user's to fix: printed as one message, exit code 1, no traceback."""
    from cogfun.config import ConfigError
    from cogfun.dataset import MetadataError
    from cogfun.dist import LaunchError
    from cogfun.models import ModelError
    from cogfun.shards import ShardError

    return (ConfigError, MetadataError, LaunchError, ModelError, ShardError, FileNotFoundError, PermissionError,
            NotADirectoryError, IsADirectoryError)


def _run(fn, *args, **kwargs):
    import errno

    from cogfun.runs import Interrupted

    try:
        return fn(*args, **kwargs)
    except Interrupted as exc:
        # a checkpoint was saved: say how to go on, and exit as a process ended by that signal (130 SIGINT,
        # 143 SIGTERM) so that a script or scheduler never takes the run for finished
        if int(os.environ.get("RANK", "0")) == 0:
            click.echo(_interrupted_message(exc), err=True)
        sys.exit(exc.exit_code)
    except _user_errors() as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            raise click.ClickException(f"cannot write: {exc}. Nothing was committed; the previous "
                                       f"manifest (if any) is untouched.") from None
        raise


def _interrupted_message(exc) -> str:
    from cogfun.runs import resume_command

    prog = "cogfun" if Path(sys.argv[0]).name == "cogfun" else sys.argv[0]
    command = resume_command([prog, *sys.argv[1:]], exc.checkpoint)
    if "LOCAL_RANK" in os.environ:  # started by accelerate launch / torchrun: its flags are not ours to see
        command = f"accelerate launch <the same launch flags> {command}"
    return f"{exc}\nResume with:\n  {command}"


class _Group(click.Group):
    def parse_args(self, ctx, args):
        # CogVideoX-Fun's several-value flags (--validation_prompts "a" "b"), as declared in cogfun/config.py
        from cogfun.config import join_several

        return super().parse_args(ctx, join_several(TrainConfig, args))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="cogfun")
def main():
    """cogfun: precompute VAE latents + T5 embeddings once, then train CogVideoX-Fun LoRAs on them."""


@main.command(name="precompute")
@click_options(PrecomputeConfig)
@click.pass_context
def precompute(ctx, **params):
    """Encode a CogVideoX-Fun dataset into fingerprinted WebDataset shards."""
    cfg = _run(build_config, PrecomputeConfig, params, ctx)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from cogfun.stages.precompute import precompute as run

    _run(run, cfg)


@main.command(name="train")
@click_options(TrainConfig)
@click.pass_context
def train(ctx, **params):
    """Train a LoRA from cached shards (precomputing them first when given --train_data_meta).

    One run per --output_dir. Ctrl-C (SIGINT) or SIGTERM saves a checkpoint at the next step boundary,
    prints the command that resumes it and exits with 130 / 143."""
    cfg = _run(build_config, TrainConfig, params, ctx)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from cogfun.pipelines.precompute_then_train import run

    _run(run, cfg)


@main.command(name="sample")
@click_options(SampleConfig)
@click.pass_context
def sample(ctx, **params):
    """Generate videos (text-to-video, or image-to-video with an InP model), optionally with a trained LoRA."""
    cfg = _run(build_config, SampleConfig, params, ctx)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from cogfun.stages.sample import sample as run

    _run(run, cfg)


@main.command(name="inspect-buckets")
@click_options(InspectConfig)
@click.pass_context
def inspect_buckets(ctx, **params):
    """Show what a dataset becomes (buckets, frames, tokens, bytes, skipped clips) before any GPU time."""
    cfg = _run(build_config, InspectConfig, params, ctx)
    from cogfun.inspect import run

    _run(run, cfg)


@main.command(name="export-lora")
@click.argument("checkpoint", type=click.Path(exists=True))
@click_options(ExportLoraConfig)
@click.pass_context
def export_lora(ctx, checkpoint, **params):
    """Convert a LoRA to another format: CHECKPOINT is a training output dir, a checkpoint-<N>/ dir (a
    killed run's too) or a diffusers-format LoRA file."""
    cfg = _run(build_config, ExportLoraConfig, params, ctx)
    from cogfun.lora import export_lora as run

    file = _run(run, checkpoint, cfg.format, cfg.output)
    click.echo(f"{cfg.format} LoRA written to {file}")


@main.command(name="demo")
@click.option("--workdir", type=click.Path(file_okay=False), default="demo-run", show_default=True,
              help="Folder for the tiny model, the synthetic clips, the shards and the training output.")
@click.option("--steps", type=int, default=20, show_default=True, help="Training steps.")
def demo(workdir, steps):
    """Tiny InP model + synthetic clips: precompute, then train, on the CPU."""
    from cogfun.pipelines.demo import run

    _run(run, Path(workdir), steps=steps)


if __name__ == "__main__":
    main()
