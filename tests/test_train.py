"""`cogfun train` for real: tiny InP model, real shards, DDP / ZeRO-2 / FSDP2 over gloo, exact resume."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cogfun.config import PrecomputeConfig, TrainConfig
from cogfun.dist import LaunchError, check_world
from cogfun.shards import ShardError

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv" / "bin"
DATA = dict(video_sample_size=64, image_sample_size=64, token_sample_size=64, video_sample_n_frames=9,
            video_sample_stride=2, enable_bucket=True, train_mode="inpaint", mask_policies="i2v,first_last",
            num_views=2, seed=42)
TRAIN_FLAGS = ["--train_mode", "inpaint", "--mixed_precision", "no", "--rank", "4", "--network_alpha", "2",
               "--learning_rate", "1e-3", "--dataloader_num_workers", "0", "--report_to", "none",
               "--max_grad_norm", "0.001", "--random_frame_crop", "--seed", "42"]  # clipping active every step
FSDP_LAUNCH = ["--use_fsdp", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP", "--fsdp_transformer_layer_cls_to_wrap",
               "CogVideoXBlock", "--fsdp_sharding_strategy", "FULL_SHARD", "--fsdp_state_dict_type=SHARDED_STATE_DICT",
               "--fsdp_backward_prefetch", "BACKWARD_PRE", "--fsdp_cpu_ram_efficient_loading", "False"]
LAUNCHES = {
    "ddp": (["--multi_gpu", "--num_processes", "2"], {"ACCELERATE_USE_CPU": "true"}),
    "deepspeed": (["--use_deepspeed", "--deepspeed_config_file", str(ROOT / "config/zero_stage2_config.json"),
                   "--deepspeed_multinode_launcher", "standard", "--num_processes", "2"], {}),
    "fsdp": (FSDP_LAUNCH + ["--num_processes", "2"], {}),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_env(extra=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               TORCH_EXTENSIONS_DIR=str(ROOT / ".venv" / "torch_extensions"))
    for key in ("ACCELERATE_USE_CPU", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP", "WORLD_SIZE"):
        env.pop(key, None)
    env.update(extra or {})
    return env


def run_cli(args, launch=None, env=None, timeout=400):
    if launch is None:
        cmd = [str(VENV / "python"), str(ROOT / "cli.py"), *args]
    else:
        cmd = [str(VENV / "accelerate"), "launch", *launch, "--main_process_port", str(free_port()),
               str(ROOT / "cli.py"), *args]
    out = subprocess.run(cmd, cwd=ROOT, env=cli_env(env), capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(cmd)}\nSTDOUT:\n{out.stdout[-3000:]}\nSTDERR:\n{out.stderr[-6000:]}"
    return out


def losses(out_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out_dir / "train_log.jsonl").read_text().splitlines()]


def lora(out_dir: Path) -> dict:
    return load_file(str(out_dir / "pytorch_lora_weights.safetensors"))


def assert_same_lora(a: dict, b: dict, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-4, msg=k)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_inp, tiny_model_t2v, synthetic_data):
    from cogfun.stages.precompute import precompute

    root = tmp_path_factory.mktemp("train")
    shards = root / "shards"
    precompute(PrecomputeConfig(pretrained_model_name_or_path=str(tiny_model_inp), train_data_meta=str(synthetic_data),
                                train_data_dir=str(synthetic_data.parent), shard_dir=str(shards), mixed_precision="no",
                                dataloader_num_workers=0, **DATA), progress=False)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    return {"root": root, "model": tiny_model_inp, "t2v": tiny_model_t2v, "meta": synthetic_data, "shards": shards}


def base_args(setup, out, steps=4, ckpt=2, accumulation=1):
    return ["train", "--pretrained_model_name_or_path", str(setup["model"]), "--shard_dir", str(setup["shards"]),
            "--output_dir", str(out), "--max_train_steps", str(steps), "--checkpointing_steps", str(ckpt),
            "--gradient_accumulation_steps", str(accumulation), *TRAIN_FLAGS]


@pytest.fixture(scope="module")
def reference(setup):
    """One process, accumulation 2: the same global batches as 2 ranks x accumulation 1."""
    out = setup["root"] / "ref"
    run_cli(base_args(setup, out, accumulation=2))
    return out


@pytest.mark.parametrize("kind", ["ddp", "deepspeed", "fsdp"])
def test_two_processes_match_one_and_resume_exactly(setup, reference, kind):
    launch, env = LAUNCHES[kind]
    norms = [json.loads(line)["grad_norm"] for line in (reference / "train_log.jsonl").read_text().splitlines()]
    assert min(norms) > 0.001 * 2, "the gradients must exceed --max_grad_norm for this test to check clipping"
    out = setup["root"] / kind
    run_cli(base_args(setup, out), launch=launch, env=env)
    run_config = json.loads((out / "run_config.json").read_text())
    assert run_config["world_size"] == 2 and run_config["launch"] == ("ddp" if kind == "ddp" else kind)
    assert losses(out) == pytest.approx(losses(reference), rel=1e-5)
    assert_same_lora(lora(out), lora(reference), atol=1e-5)
    assert (out / "checkpoint-2" / "cogfun_state.json").is_file()
    check_checkpoint_layout(out / "checkpoint-2")
    full = lora(out)
    # resume from step 2 into the same output dir: steps 3-4 and the LoRA come out the same
    run_cli(base_args(setup, out) + ["--resume_from_checkpoint", str(out / "checkpoint-2")], launch=launch, env=env)
    assert losses(out) == pytest.approx(losses(reference), rel=1e-5)
    assert_same_lora(lora(out), full, atol=1e-6)


def check_checkpoint_layout(ckpt: Path) -> None:
    """One LoRA copy (diffusers format, read by resume), no kohya file, and no model tensors in
    accelerate's / DeepSpeed's / DCP's files: what is not the LoRA file is optimizer and RNG state."""
    lora_file = ckpt / "pytorch_lora_weights.safetensors"
    assert lora_file.is_file() and not (ckpt / "pytorch_lora_weights_kohya.safetensors").exists()
    for f in ckpt.rglob("*.safetensors"):
        if f != lora_file:
            assert not load_file(str(f)), f"{f.relative_to(ckpt)} holds tensors"
    # accelerate's model file, DCP's model folder, DeepSpeed's module record: metadata only. The
    # model part of a checkpoint (these + the LoRA file) stays under 2x the LoRA file (issue goal).
    others = [f for f in ckpt.rglob("*") if f.is_file() and "model" in str(f.relative_to(ckpt)).lower()
              and "optim" not in f.name and f != lora_file]
    assert sum(f.stat().st_size for f in others) < lora_file.stat().st_size, \
        {str(f.relative_to(ckpt)): f.stat().st_size for f in others}


def test_kill_and_resume_latest_single_process(setup, tmp_path):
    steps, every = 120, 10
    ref = tmp_path / "ref"
    run_cli(base_args(setup, ref, steps=steps, ckpt=every))
    out = tmp_path / "killed"
    args = base_args(setup, out, steps=steps, ckpt=every)
    proc = subprocess.Popen([str(VENV / "python"), str(ROOT / "cli.py"), *args], cwd=ROOT, env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / f"checkpoint-{every}" / "cogfun_state.json").exists():
        assert proc.poll() is None and time.time() < deadline, "training ended before its first checkpoint"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "pytorch_lora_weights.safetensors").exists(), "killed too late to test a resume"
    res = run_cli(args + ["--resume_from_checkpoint", "latest"])
    assert "resumed from" in res.stdout
    assert losses(out) == pytest.approx(losses(ref), rel=1e-6)
    assert_same_lora(lora(out), lora(ref), atol=0)


def test_latest_skips_incomplete_checkpoints_and_bare_names_are_in_the_output_dir(tmp_path, monkeypatch):
    from cogfun.config import ConfigError
    from cogfun.stages.train import CHECKPOINT_STATE, find_checkpoint

    out = tmp_path / "out"
    for step in (2, 4, 10):
        (out / f"checkpoint-{step}").mkdir(parents=True)
        (out / f"checkpoint-{step}" / CHECKPOINT_STATE).write_text(json.dumps({"global_step": step}))
    (out / ".checkpoint-12.tmp").mkdir()          # killed while saving
    (out / "checkpoint-14").mkdir()                # no state file: not complete
    assert find_checkpoint(out, "latest") == out / "checkpoint-10"   # by step, not by name
    assert find_checkpoint(out, None) is None
    with pytest.raises(ConfigError, match="not a complete"):
        find_checkpoint(out, str(out / "checkpoint-14"))
    monkeypatch.chdir(tmp_path)                    # a bare name: CogVideoX-Fun joins it with --output_dir
    assert find_checkpoint(out, "checkpoint-4") == out / "checkpoint-4"
    assert find_checkpoint(out, str(out / "checkpoint-2")) == out / "checkpoint-2"
    with pytest.raises(ConfigError, match=r"checkpoint-9: does not exist \(neither .*checkpoint-9 nor"):
        find_checkpoint(out, "checkpoint-9")
    with pytest.raises(ConfigError, match="checkpoint-14 is not a complete cogfun checkpoint"):
        find_checkpoint(out, "checkpoint-14")


def test_pinned_loss_curve_and_no_vae_or_t5(setup, tmp_path, monkeypatch):
    """In-process: the VAE and T5 classes are never constructed, and the first losses are pinned."""
    import diffusers
    import transformers

    from cogfun.stages.train import train

    def forbidden(self, *a, **k):
        raise AssertionError(f"{type(self).__name__} constructed in the training process")

    monkeypatch.setattr(diffusers.AutoencoderKLCogVideoX, "__init__", forbidden)
    monkeypatch.setattr(transformers.T5EncoderModel, "__init__", forbidden)
    cfg = TrainConfig(pretrained_model_name_or_path=str(setup["model"]), shard_dir=str(setup["shards"]),
                      output_dir=str(tmp_path / "out"), max_train_steps=6, checkpointing_steps=100,
                      mixed_precision="no", rank=4, network_alpha=2.0, learning_rate=1e-3, dataloader_num_workers=0,
                      report_to="none", max_grad_norm=0.05, random_frame_crop=True, **DATA)
    result = train(cfg)
    got = result["losses"]
    print("losses", got)
    assert got == pytest.approx(PINNED, rel=1e-4)
    assert len(json.loads((tmp_path / "out" / "run_config.json").read_text())["lora_targets"]) == 10


# (re-pinned when the transformer took CogVideoX-Fun's positions: issue 17)
PINNED = [1.4463200569152832, 1.517757773399353, 1.744213581085205, 1.602669358253479, 1.3456865549087524,
          1.794705867767334]


def test_identical_runs_write_byte_identical_lora_files(setup, tmp_path, monkeypatch):
    """Two identical runs (relative --output_dir, as the same command run in two places): every LoRA file,
    final and checkpoint, diffusers / kohya / ComfyUI, has the same bytes (the header order was random)."""
    from accelerate.state import AcceleratorState, GradientState

    from cogfun.lora import EXPORT_FORMATS
    from cogfun.stages.train import train

    for where in ("a", "b"):
        (tmp_path / where).mkdir()
        monkeypatch.chdir(tmp_path / where)
        train(TrainConfig(pretrained_model_name_or_path=str(setup["model"]), shard_dir=str(setup["shards"]),
                          output_dir="out", max_train_steps=2, checkpointing_steps=100, checkpoint_kohya=True,
                          mixed_precision="no", rank=4, network_alpha=2.0, dataloader_num_workers=0,
                          report_to="none", **DATA))
        GradientState._reset_state()
        AcceleratorState._reset_state(True)
    for folder in ("out", "out/checkpoint-2"):
        for name in EXPORT_FORMATS.values():
            a, b = tmp_path / "a" / folder / name, tmp_path / "b" / folder / name
            assert a.read_bytes() == b.read_bytes(), f"{folder}/{name}"
            assert a.stat().st_mode & 0o077 == 0o066 & ~shards_umask(), f"{folder}/{name}: not the user's umask"


def shards_umask() -> int:
    from cogfun.shards import user_umask

    return user_umask()


def test_shards_that_do_not_fit_are_refused(setup, tmp_path):
    from cogfun.stages.train import train

    common = dict(shard_dir=str(setup["shards"]), output_dir=str(tmp_path / "o"), max_train_steps=1,
                  mixed_precision="no", report_to="none", dataloader_num_workers=0)
    with pytest.raises(ShardError, match="in_channels"):
        train(TrainConfig(pretrained_model_name_or_path=str(setup["t2v"]), **{**DATA, "train_mode": "inpaint"}, **common))
    # train --shard_dir takes the mode from the shards; the check itself, for an InP model on normal shards:
    from types import SimpleNamespace

    from cogfun import models
    from cogfun.stages.train import check_shards_fit

    manifest = json.loads((setup["shards"] / "manifest.json").read_text())
    tcfg = SimpleNamespace(**models.read_component_config(setup["model"], "transformer"))
    with pytest.raises(ShardError, match="in_channels: --train_mode normal needs 16, the transformer has 33"):
        check_shards_fit({**manifest, "mask_policies": []}, tcfg, "normal", models.transformer_family(setup["model"]))


def test_trained_lora_loads_in_diffusers_with_its_scale(setup, reference):
    from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel

    from cogfun.lora import inject_lora

    base = CogVideoXTransformer3DModel.from_pretrained(setup["model"] / "transformer")
    ours = CogVideoXTransformer3DModel.from_pretrained(setup["model"] / "transformer")
    trained = lora(reference)
    targets = inject_lora(ours, rank=4, alpha=2.0, target_name="to_q,to_k,to_v,ff.0,ff.2")
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(ours, {k.removeprefix("transformer."): v for k, v in trained.items()})
    assert not result.unexpected_keys and len(targets) == 10
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=base,
                             scheduler=CogVideoXDDIMScheduler())
    torch.manual_seed(0)
    x = torch.randn(1, 3, 33, 8, 8)
    text = torch.randn(1, 226, 32)
    t = torch.tensor([500])
    with torch.no_grad():
        before = base(hidden_states=x, encoder_hidden_states=text, timestep=t, return_dict=False)[0]
        pipe.load_lora_weights(str(reference))
        after = base(hidden_states=x, encoder_hidden_states=text, timestep=t, return_dict=False)[0]
        expected = ours(hidden_states=x, encoder_hidden_states=text, timestep=t, return_dict=False)[0]
    assert (after - before).abs().max() > 1e-4          # the LoRA does something
    torch.testing.assert_close(after, expected, atol=1e-5, rtol=1e-4)   # exactly our LoRA, alpha/rank applied


SEED_LAUNCH = {  # the seed's accelerate flags, verbatim (+ 2 processes for the distributed ones)
    "plain": ['--mixed_precision=bf16'],
    "deepspeed": ["--use_deepspeed", "--deepspeed_config_file", str(ROOT / "config/zero_stage2_config.json"),
                  "--deepspeed_multinode_launcher", "standard", "--num_processes", "2"],
    "fsdp": ["--mixed_precision=bf16"] + FSDP_LAUNCH + ["--num_processes", "2"],
}


@pytest.mark.parametrize("line", ["plain", "deepspeed", "fsdp"])
def test_seed_launch_lines_precompute_then_train(setup, tmp_path, line):
    """The seed's three launch lines with `cli.py train`, flags unchanged in name (values shrunk for the CPU)."""
    out = tmp_path / "seed_out"
    flags = ["train", f"--pretrained_model_name_or_path={setup['model']}", f"--train_data_dir={setup['meta'].parent}",
             f"--train_data_meta={setup['meta']}", "--image_sample_size=64", "--video_sample_size=64",
             "--token_sample_size=64", "--video_sample_stride=2", "--video_sample_n_frames=9", "--train_batch_size=1",
             "--video_repeat=1", "--gradient_accumulation_steps=1", "--dataloader_num_workers=1",
             "--num_train_epochs=100", "--max_train_steps=3", "--checkpointing_steps=50", "--learning_rate=1e-04",
             "--seed=42", f"--output_dir={out}", "--gradient_checkpointing", "--mixed_precision=bf16",
             "--adam_weight_decay=3e-2", "--adam_epsilon=1e-10", "--vae_mini_batch=1", "--max_grad_norm=0.05",
             "--random_hw_adapt", "--training_with_video_token_length", "--enable_bucket", "--rank=64",
             "--network_alpha=32", "--target_name=to_q,to_k,to_v,ff.0,ff.2", "--use_peft_lora", "--low_vram",
             "--train_mode=inpaint", "--report_to=none"]
    run_cli(flags, launch=SEED_LAUNCH[line])
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    assert manifest["num_samples"] > 0 and manifest["config"]["mixed_precision"] == "bf16"
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    run_config = json.loads((out / "run_config.json").read_text())
    assert run_config["launch"] == ("single" if line == "plain" else line)
    assert len(losses(out)) == 3 and all(l == l for l in losses(out))
    if line == "plain":   # one run per output dir: the same launch again resumes it (at its end: nothing to train)
        again = run_cli(flags + ["--resume_from_checkpoint", "latest"], launch=SEED_LAUNCH[line])
        assert "up to date" in again.stdout


def test_launch_guard(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(LaunchError, match="independent copies"):
        check_world(1)
    check_world(2)


# ------------------------------------------------------------------ several machines, shards over HTTP

MACHINE_LAUNCHES = {  # one process per "machine"; the machines find each other on 127.0.0.1
    "ddp": (["--multi_gpu"], {"ACCELERATE_USE_CPU": "true"}),
    "deepspeed": (["--use_deepspeed", "--deepspeed_config_file", str(ROOT / "config/zero_stage2_config.json"),
                   "--deepspeed_multinode_launcher", "standard"], {}),
}


def launch_machines(kind, args_of, logs: Path, timeout=400) -> list[subprocess.CompletedProcess]:
    """`accelerate launch --num_machines 2 --machine_rank r ...` for r = 0, 1 at once; args_of(r) -> cli args.
    Returns both results (stdout + stderr in .stdout); does not check them."""
    launch, env = MACHINE_LAUNCHES[kind]
    port = free_port()
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for r in (0, 1):
        cmd = [str(VENV / "accelerate"), "launch", *launch, "--num_machines", "2", "--machine_rank", str(r),
               "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), "--num_processes", "2",
               str(ROOT / "cli.py"), *args_of(r)]
        log = open(logs / f"machine{r}.log", "w+")
        procs.append((cmd, log, subprocess.Popen(cmd, cwd=ROOT, env=cli_env(env), stdout=log, stderr=subprocess.STDOUT)))
    results = []
    for cmd, log, proc in procs:
        try:
            proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
        log.seek(0)
        results.append(subprocess.CompletedProcess(cmd, proc.returncode, log.read(), ""))
        log.close()
    return results


def check_ok(results):
    for r in results:
        assert r.returncode == 0, f"{' '.join(r.args)}\n{r.stdout[-8000:]}"


@pytest.fixture(scope="module")
def http_shards(setup):
    from cogfun.testing import HTTPShardServer

    with HTTPShardServer(setup["shards"]) as server:
        yield server


def http_args(setup, server, out, cache, steps=4, ckpt=2):
    return [*base_args(setup, out, steps=steps, ckpt=ckpt), "--shard_dir", server.url, "--shard_cache_dir", str(cache),
            "--shard_fetch_backoff", "0.05", "--dataloader_num_workers", "2"]


def test_two_machines_ddp_from_http_match_one_process_and_resume(setup, reference, http_shards, tmp_path):
    """2 machines x 1 process (DDP over gloo), each with its own shard cache, one shared output dir:
    the same losses and LoRA as one local process with accumulation 2; a connection dropped mid-tar
    is retried; resuming from checkpoint-2 gives the same run."""
    manifest = json.loads((setup["shards"] / "manifest.json").read_text())
    flaky = sorted(manifest["shards"])[0]
    http_shards.drop(flaky, 1)
    before = http_shards.gets
    out = tmp_path / "out"
    check_ok(launch_machines("ddp", lambda r: http_args(setup, http_shards, out, tmp_path / f"cache{r}"), tmp_path / "a"))
    assert losses(out) == pytest.approx(losses(reference), rel=1e-5)
    assert_same_lora(lora(out), lora(reference), atol=1e-5)
    check_checkpoint_layout(out / "checkpoint-2")
    gets = http_shards.gets - before
    files = [*manifest["shards"], *manifest["prompt_tables"]]
    assert gets[flaky] >= 2 and all(gets[f] <= 2 + (f == flaky) for f in files), gets   # once per machine (+1 drop)
    sizes = {**manifest["shard_bytes"], **manifest["prompt_tables"]}
    for r in (0, 1):    # each machine's cache: complete files only, of the recorded sizes
        (store_dir,) = [d for d in (tmp_path / f"cache{r}").iterdir() if not d.name.startswith(".")]
        cached = {p.name.replace("%2F", "/"): p.stat().st_size for p in store_dir.iterdir()}
        assert cached and all(sizes[k] == v for k, v in cached.items()), cached
        assert not list((tmp_path / f"cache{r}" / ".partial").iterdir())
    full = lora(out)
    check_ok(launch_machines("ddp", lambda r: http_args(setup, http_shards, out, tmp_path / f"cache{r}")
                             + ["--resume_from_checkpoint", str(out / "checkpoint-2")], tmp_path / "b"))
    assert losses(out) == pytest.approx(losses(reference), rel=1e-5)
    assert_same_lora(lora(out), full, atol=1e-6)


def test_two_machines_zero2_from_http_and_an_unshared_output_dir(setup, reference, http_shards, tmp_path):
    """ZeRO-2 on 2 machines from HTTP matches one process; with an output dir per machine (not
    shared) validation works (rank 0 sends the encoded prompts: machine 1 reads nothing of its
    output dir) and writes the videos on machine 0, the checkpoint is reported incomplete when
    saved, and a resume stops with a message naming what the other machine cannot see."""
    outs = [tmp_path / "m0", tmp_path / "m1"]
    validation = ["--validation_prompts", "A red fox runs. | A golden owl sleeps.", "--validation_steps", "4",
                  "--validation_num_frames", "5", "--validation_height", "32", "--validation_width", "32",
                  "--validation_num_inference_steps", "1"]
    first = launch_machines("deepspeed", lambda r: http_args(setup, http_shards, outs[r], tmp_path / f"cache{r}")
                            + validation, tmp_path / "a")
    check_ok(first)
    assert losses(outs[0]) == pytest.approx(losses(reference), rel=1e-5)
    assert_same_lora(lora(outs[0]), lora(reference), atol=1e-5)
    assert "--output_dir is not shared" in first[0].stdout
    videos = json.loads((outs[0] / "samples" / "step-4" / "index.json").read_text())["videos"]
    assert [v["prompt"] for v in videos] == ["A red fox runs.", "A golden owl sleeps."]   # one from each machine
    assert all((outs[0] / "samples" / "step-4" / v["file"]).is_file() for v in videos)
    assert not (outs[1] / "validation").exists() and not (outs[1] / "samples").exists()
    again = launch_machines("deepspeed", lambda r: http_args(setup, http_shards, outs[r], tmp_path / f"cache{r}")
                            + ["--resume_from_checkpoint", "latest"], tmp_path / "b")
    for result in again:
        assert result.returncode != 0
    message = again[0].stdout
    assert f"cannot resume from {outs[0] / 'checkpoint-4'}" in message, message[-4000:]
    assert "rank 1 on" in message and "random_states_1.pkl" in message and "shared" in message
