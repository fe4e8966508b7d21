"""Settings declared once: CLI options, help, TOML precedence, the seed's flag set, metadata errors."""

import json
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import pytest
from click.testing import CliRunner

from cogfun import cli
from cogfun.config import (ConfigError, InspectConfig, PrecomputeConfig, SampleConfig, TrainConfig, fingerprint_keys,
                           load_toml, mask_policy_list)
from cogfun.dataset import MetadataError, load_sources, read_metadata

ROOT = Path(__file__).resolve().parents[1]
SEED_DOC = ROOT.parent / "shared" / "seed" / "lora_training.md"

SEED_TRAIN_FLAGS = """--pretrained_model_name_or_path=M --train_data_dir=D --train_data_meta=D/metadata.json
--image_sample_size=512 --video_sample_size=512 --token_sample_size=512 --video_sample_stride=3
--video_sample_n_frames=49 --train_batch_size=1 --video_repeat=1 --gradient_accumulation_steps=1
--dataloader_num_workers=8 --num_train_epochs=100 --checkpointing_steps=50 --learning_rate=1e-04 --seed=42
--output_dir=output_dir --gradient_checkpointing --mixed_precision=bf16 --adam_weight_decay=3e-2
--adam_epsilon=1e-10 --vae_mini_batch=1 --max_grad_norm=0.05 --random_hw_adapt --training_with_video_token_length
--enable_bucket --rank=64 --network_alpha=32 --target_name=to_q,to_k,to_v,ff.0,ff.2 --use_peft_lora --low_vram
--train_mode=inpaint""".split()


def parse(command, args):
    """Run click's parser only: the config the command would run with."""
    ctx = command.make_context(command.name, list(args))
    from cogfun.config import build_config

    cls = {"train": TrainConfig, "precompute": PrecomputeConfig, "inspect-buckets": InspectConfig}[command.name]
    return build_config(cls, ctx.params, ctx)


def test_every_setting_is_an_option_with_help():
    for command, cls in ((cli.train, TrainConfig), (cli.precompute, PrecomputeConfig),
                         (cli.inspect_buckets, InspectConfig), (cli.sample, SampleConfig)):
        opts = {p.name: p for p in command.params}
        for f in fields(cls):
            assert f.name in opts, f"{command.name} lacks --{f.name}"
            assert f.metadata["help"], f.name
            assert opts[f.name].opts == [f"--{f.name}"]


def test_seed_flags_parse_with_their_meaning():
    cfg = parse(cli.train, SEED_TRAIN_FLAGS)
    assert cfg.video_sample_n_frames == 49 and cfg.video_sample_stride == 3
    assert cfg.random_hw_adapt and cfg.training_with_video_token_length and cfg.enable_bucket
    assert cfg.gradient_checkpointing and cfg.use_peft_lora and cfg.low_vram
    assert cfg.rank == 64 and cfg.network_alpha == 32.0 and cfg.max_grad_norm == 0.05
    assert cfg.train_mode == "inpaint" and cfg.mixed_precision == "bf16" and cfg.learning_rate == 1e-4


def test_seed_doc_flags_are_all_known():
    """Every flag of the seed's three launch lines is an option of `cogfun train`."""
    if not SEED_DOC.exists():
        pytest.skip("shared/seed not beside the checkout")
    import re

    text = SEED_DOC.read_text()
    script_flags = set()
    for block in text.split("train_lora.py")[1:]:
        script_flags |= set(re.findall(r"--([a-z_0-9]+)", block.split("```")[0]))
    known = {p.name for p in cli.train.params}
    assert script_flags and script_flags <= known, sorted(script_flags - known)


def test_toml_supplies_flags_and_command_line_wins(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('rank = 16\nnetwork_alpha = 8\nlearning_rate = 2e-4\n[data]\nvideo_sample_n_frames = 33\n')
    cfg = parse(cli.train, ["--config", str(toml), "--rank", "32"])
    assert cfg.rank == 32                  # command line wins
    assert cfg.network_alpha == 8.0        # TOML int accepted for a float
    assert cfg.learning_rate == 2e-4 and cfg.video_sample_n_frames == 33


def test_toml_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("rnak = 4\n")
    with pytest.raises(ConfigError, match="rnak"):
        load_toml(bad, TrainConfig)
    bad.write_text('rank = "four"\n')
    with pytest.raises(ConfigError, match="rank"):
        load_toml(bad, TrainConfig)
    bad.write_text('train_mode = "video"\n')
    with pytest.raises(ConfigError, match="train_mode"):
        load_toml(bad, TrainConfig)


def test_fingerprint_keys_are_byte_relevant_only():
    keys = set(fingerprint_keys())
    assert {"video_sample_size", "seed", "num_views", "train_mode", "mixed_precision", "enable_bucket"} <= keys
    assert not keys & {"video_repeat", "random_frame_crop", "dataloader_num_workers", "vae_mini_batch", "overwrite"}


def test_mask_policies_validated():
    assert mask_policy_list(PrecomputeConfig(train_mode="normal")) == []
    assert mask_policy_list(PrecomputeConfig(train_mode="inpaint", mask_policies="first_last,i2v")) == ["i2v", "first_last"]
    with pytest.raises(ConfigError, match="bogus"):
        mask_policy_list(PrecomputeConfig(train_mode="i2v", mask_policies="i2v,bogus"))


def test_help_is_instant_and_does_not_import_torch():
    code = ("import sys, cli; cli.main(['train', '--help'], standalone_mode=False); "
            "cli.main(['sample', '--help'], standalone_mode=False); assert 'torch' not in sys.modules")
    t0 = time.time()
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "--video_sample_n_frames" in out.stdout
    assert time.time() - t0 < 2.0


@pytest.mark.parametrize("content,match", [
    ("[{\"file_path\": \"a.mp4\", \"text\": \"x\"},\n {\"file_path\": \"b.mp4\" \"text\": 1}]", "line 2"),
    ("{\"file_path\": \"a.mp4\"}", "JSON list"),
    ("[1, 2]", "row 0"),
])
def test_malformed_json_metadata_names_file_and_line(tmp_path, content, match):
    meta = tmp_path / "metadata.json"
    meta.write_text(content)
    with pytest.raises(MetadataError, match=match) as err:
        read_metadata(meta)
    assert str(meta) in str(err.value)


def test_malformed_csv_metadata(tmp_path):
    meta = tmp_path / "meta.csv"
    meta.write_text("path,caption\na.mp4,hello\n")
    with pytest.raises(MetadataError, match="line 1"):
        read_metadata(meta)
    meta.write_text('file_path,text,type\na.mp4,hello,video\nb.mp4,"unterminated,video,extra\n')
    with pytest.raises(MetadataError, match="line"):
        read_metadata(meta)


def test_missing_metadata_is_a_clean_cli_error(tmp_path):
    res = CliRunner().invoke(cli.main, ["inspect-buckets", "--train_data_meta", str(tmp_path / "nope.json")])
    assert res.exit_code == 1
    assert "metadata file not found" in res.output and "Traceback" not in res.output


def test_bad_rows_are_skipped_with_reasons(tmp_path):
    meta = tmp_path / "metadata.json"
    meta.write_text(json.dumps([
        {"file_path": "a.mp4", "text": "ok", "type": "video"},
        {"text": "no path", "type": "video"},
        {"file_path": "b.mp4", "type": "video"},
        {"file_path": "c.wav", "text": "sound", "type": "audio"},
        {"file_path": "a.mp4", "text": "again", "type": "video"},    # a caption variant: a second sample
        {"file_path": "a.mp4", "text": "ok", "type": "video"},       # an exact repeat: one sample, reported
        {"file_path": "a.mp4", "text": "ok", "type": "image"},       # its first frame, as an image
        {"file_path": ["a.mp4", "b.mp4"], "text": "two", "type": "video"},   # not one path
    ]))
    sources, skipped = load_sources(meta, tmp_path)
    assert [(s.identity, s.text, s.kind) for s in sources] == [
        ("a.mp4", "ok", "video"), ("a.mp4#2", "again", "video"), ("a.mp4#3", "ok", "image")]
    reasons = {s.file_path: (s.reason, s.category) for s in skipped}
    assert reasons["<row 1>"] == ("row has no file_path", "bad row")
    assert reasons["<row 7>"] == ("file_path must be one path (a string), got list ['a.mp4', 'b.mp4']", "bad row")
    assert "no text" in reasons["b.mp4"][0]
    assert "audio" in reasons["c.wav"][0]
    assert reasons["a.mp4"] == ("row 5 repeats row 0 (same file_path, text and type): one sample", "duplicate row")


def test_mask_policy_names_and_num_views_setting(tmp_path):
    from cogfun import masks
    from cogfun.config import DEFAULT_MASK_POLICIES, MASK_POLICIES, num_views_setting

    assert MASK_POLICIES == masks.POLICIES and DEFAULT_MASK_POLICIES.split(",") == list(masks.DEFAULT_POLICIES)
    assert mask_policy_list(PrecomputeConfig(train_mode="inpaint", mask_policies="all")) == list(MASK_POLICIES)
    toml = tmp_path / "views.toml"
    toml.write_text("num_views = 3\n")
    assert load_toml(toml, PrecomputeConfig) == {"num_views": "3"}            # an integer in TOML is fine
    assert num_views_setting("3") == 3 and num_views_setting(2) == 2 and num_views_setting("auto") == "auto"
    for bad in ("0", "many"):
        with pytest.raises(ConfigError, match="num_views"):
            num_views_setting(bad)
    cfg = parse(cli.precompute, ["--num_views", "auto", "--max_views", "4", "--mask_policies", "i2v,block"])
    assert (cfg.num_views, cfg.max_views, cfg.mask_policies) == ("auto", 4, "i2v,block")


def test_demo_trains_the_products_default_conditioning(tmp_path):
    """`cogfun demo` shows what a default inpaint run trains: the default mask policies (and their weights)."""
    from cogfun.config import DEFAULT_MASK_POLICIES
    from cogfun.pipelines.demo import data_settings

    cfg = PrecomputeConfig(**data_settings(tmp_path / "metadata.json"))
    assert cfg.train_mode == "inpaint" and cfg.mask_policies == DEFAULT_MASK_POLICIES


def test_slurm_scripts_pass_flags_their_command_declares():
    """config/slurm_*.sh: every --flag after `cli.py <command>` is a setting of that command."""
    import re

    root = Path(__file__).resolve().parents[1]
    for script, cls in (("slurm_precompute.sh", PrecomputeConfig), ("slurm_train.sh", TrainConfig)):
        text = (root / "config" / script).read_text()
        command = text[text.rindex("cli.py "):text.rindex("' _ ")]   # the launched command line
        flags = set(re.findall(r"--([a-z_0-9]+)", command))
        declared = {f.name for f in fields(cls)}
        assert flags and flags <= declared, (script, sorted(flags - declared))
    text = (root / "config" / "slurm_precompute.sh").read_text()
    assert "--train_data_shards" in text and "--train_data_meta" in text and "--media_cache_dir" in text
