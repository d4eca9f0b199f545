"""engine/settings.py: one table behind train.py's flags and config files; every bad value is one line, before any work."""
import json

import pytest
import torch

import train
from engine import settings
from engine.settings import TABLE, TRAIN_SETTINGS
from tests.conftest import REPO

# train.parse_args's attribute names before the table existed (plus --overwrite): scripts rely on them.
NAMES = {"config", "dataset", "data_root", "clip", "clip_arch", "output_dir", "image_size", "mean_std", "batch_size",
         "epochs", "lr_head", "lr_image", "lr_text", "wd_image", "warmup_epochs", "warmup_start", "milestones", "gamma",
         "cmpm_weights", "cmpc_weights", "diversity_weight", "ranking_weight", "margin", "gather_features", "sync_bn",
         "amp", "device", "workers", "seed", "eval_every", "eval_batch_size", "eval_at_start", "resume",
         "max_nonfinite", "no_progress", "overwrite", "text_encoder", "bert", "compile", "select_on", "tensorboard",
         "log_every", "chunk_size", "mgf", "cfr", "fcd", "tf32"}


def parse_error(argv, capsys):
    """The one stderr line of a refused command line (exit status 2)."""
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_the_table_gives_the_defaults_and_the_attribute_names(monkeypatch):
    args = train.parse_args([])
    assert set(settings.as_dict(args)) == NAMES and {s.name for s in TRAIN_SETTINGS} == NAMES
    assert all(getattr(args, s.name) == s.default for s in TRAIN_SETTINGS if s.name != "device")
    assert args.device == ("cuda" if torch.cuda.is_available() else "cpu")  # decided after parsing: --help needs no torch
    assert (args.batch_size, args.epochs, args.lr_head, args.milestones, args.image_size) == (32, 50, 1e-4, [20, 25, 35],
                                                                                                [224, 224])
    assert args._given == {}


@pytest.mark.parametrize("argv, named", [
    (["--batch_size", "1"], "--batch_size: 1 is not allowed; batch_size takes an integer >= 2"),
    (["--epochs", "0"], "--epochs: 0 is not allowed; epochs takes an integer >= 1"),
    (["--eval_every", "0"], "--eval_every: 0 is not allowed; eval_every takes an integer >= 1"),
    (["--lr_head=-1e-4"], "--lr_head: -0.0001 is not allowed; lr_head takes a number >= 0"),
    (["--lr_text", "nan"], "--lr_text: NaN is not allowed; lr_text takes a number >= 0"),
    (["--image_size", "0", "32"], "image_size takes a list of 2 values, each an integer >= 1"),
    (["--clip", "none", "--clip_arch", "tiny", "--image_size", "60", "32"],
     "--image_size 60 32 is not allowed; image_size takes multiples of the patch size 8 of --clip none (e.g. 64 32)"),
    (["--image_size", "384", "130"], "multiples of the patch size 16 of --clip ViT-B/16 (e.g. 384 128)"),
    (["--device", "mps"], '--device: "mps" is not allowed; device takes cpu, cuda or cuda:N'),
    (["--amp", "fp32"], '--amp: "fp32" is not allowed; amp takes one of auto, bf16, fp16, off'),
    (["--clip_arch", "huge"], '--clip_arch: "huge" is not allowed; clip_arch takes one of vit_b16, tiny'),
    (["--dataset", "Market"], "dataset takes one of CUHK-PEDES, ICFG-PEDES, RSTPReid"),
    (["--milestones", "25", "20"], "milestones takes strictly increasing epochs"),
    (["--workers", "-1"], "workers takes an integer >= 0 (or null)"),
    (["--batch_size", "x"], "argument --batch_size/--batch-size: invalid int value: 'x'"),
    (["--chunk_size", "0"], "--chunk_size: 0 is not allowed; chunk_size takes an integer >= 1 (or null)"),
    (["--chunk_size=-4"], "--chunk_size: -4 is not allowed; chunk_size takes an integer >= 1 (or null)"),
    (["--batch_size", "16", "--chunk_size", "17"], "--chunk_size 17 is larger than the batch (16 per process): give a "
                                                    "chunk size from 1 to 16"),
    # Beyond what torch's seeds (64 bits) and device indices (8 bits) hold: one line here, not an error at start.
    (["--seed", "99999999999999999999"],
     "--seed: 99999999999999999999 is not allowed; seed takes an integer >= 0 and <= 18446744073709551615"),
    (["--seed", "18446744073709551616"], "seed takes an integer >= 0 and <= 18446744073709551615"),
    (["--device", "cuda:99999999999999999999"],
     '--device: "cuda:99999999999999999999" is not allowed; device takes cpu, cuda or cuda:N with N a GPU index '
     "from 0 to 127"),
    (["--device", "cuda:128"], "device takes cpu, cuda or cuda:N with N a GPU index from 0 to 127"),
])
def test_bad_flags_fail_in_one_line_naming_the_setting_and_the_allowed_values(argv, named, capsys):
    line = parse_error(argv, capsys)
    assert line.startswith("train.py: error: ") and named in line


@pytest.mark.parametrize("values, named", [
    ({"amp": "fp32"}, '"amp": "fp32" is not allowed; amp takes one of auto, bf16, fp16, off'),
    ({"clip_arch": "huge"}, '"clip_arch": "huge" is not allowed; clip_arch takes one of vit_b16, tiny'),
    ({"milestones": 20}, '"milestones": 20 is not allowed; milestones takes a list, each an integer >= 1'),
    ({"batch_size": 32.0}, '"batch_size": 32.0 is not allowed; batch_size takes an integer >= 2'),
    ({"sync_bn": "true"}, '"sync_bn": "true" is not allowed; sync_bn takes true or false'),
    ({"eval_every": 0}, '"eval_every": 0 is not allowed'),
    ({"image_size": [384, 128, 3]}, "image_size takes a list of 2 values"),
    ({"lr_image": -1}, '"lr_image": -1 is not allowed; lr_image takes a number >= 0'),
    ({"epochz": 5}, "key 'epochz' is not a train.py setting"),
    ({"resume": "runs/x/last.pt"}, "key 'resume' is a command-line flag only"),
    ({"seed": 2**70}, '"seed": 1180591620717411303424 is not allowed; seed takes an integer >= 0 and <= '
                      "18446744073709551615"),
])
def test_bad_config_values_fail_like_flags(tmp_path, values, named, capsys):
    config = tmp_path / "bad.json"
    config.write_text(json.dumps(values))
    line = parse_error(["--config", str(config)], capsys)
    assert f"--config {config}" in line and named in line


def test_a_config_that_is_not_an_object_or_not_json(tmp_path, capsys):
    config = tmp_path / "list.json"
    config.write_text("[1, 2]")
    assert "expected a JSON object of settings, found list" in parse_error(["--config", str(config)], capsys)
    config.write_text("{'single': 'quotes'}")
    assert f"--config {config}: Expecting property name" in parse_error(["--config", str(config)], capsys)


def test_a_config_key_given_twice_or_nesting_too_deep_is_one_line(tmp_path, capsys):
    config = tmp_path / "twice.json"
    config.write_text('{"epochs": 3, "lr_head": 0.5, "epochs": 5}')  # json.loads would keep the last silently
    assert f"--config {config}: key 'epochs' is given twice; keep one" in parse_error(["--config", str(config)], capsys)
    config.write_text('{"milestones": [1, 2], "cmpm_weights": {"a": 1, "a": 2}}')
    assert "key 'a' is given twice" in parse_error(["--config", str(config)], capsys)
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    assert f"--config {deep}: nested too deeply to be a settings file" in parse_error(["--config", str(deep)], capsys)
    deep.write_text('{"a": ' * 100_000 + "1" + "}" * 100_000)
    assert "nested too deeply" in parse_error(["--config", str(deep)], capsys)


def test_test_py_device_index_beyond_what_torch_holds_is_one_line(capsys):
    import test as evaluate_script

    with pytest.raises(SystemExit):
        evaluate_script.get_args_parser().parse_args(["--checkpoint", "x.pt", "--device", "cuda:99999999999999999999"])
    assert "device takes cpu, cuda or cuda:N with N a GPU index from 0 to 127" in capsys.readouterr().err


def test_config_values_become_canonical_and_flags_override_them(tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"lr_head": 1, "cmpm_weights": [1, 1, 0], "sync_bn": True, "epochs": 7}))
    args = train.parse_args(["--config", str(config), "--epochs", "9"])
    assert args.lr_head == 1.0 and isinstance(args.lr_head, float) and args.cmpm_weights == [1.0, 1.0, 0.0]
    assert args.sync_bn is True and args.epochs == 9
    assert args._given == {"lr_head": f'--config {config}: "lr_head"', "cmpm_weights": f'--config {config}: "cmpm_weights"',
                           "sync_bn": f'--config {config}: "sync_bn"', "epochs": "--epochs", "config": "--config"}


@pytest.mark.parametrize("name", ["cuhk_pedes", "icfg_pedes", "rstpreid", "demo"])
def test_repository_configs_hold_only_what_differs_from_the_defaults(name):
    values = json.loads((REPO / "configs" / f"{name}.json").read_text())
    same = [key for key, value in values.items() if TABLE[key].check(value, key) == TABLE[key].default]
    assert not same, f"configs/{name}.json repeats defaults: {same}"
    args = train.parse_args(["--config", str(REPO / "configs" / f"{name}.json")])
    if name != "demo":  # the authors' recipe (docs/method.md §6) on each benchmark
        assert (args.batch_size, args.epochs, args.lr_head, args.lr_image, args.lr_text, args.wd_image) == (
            32, 50, 1e-4, 1e-5, 1e-5, 4e-5)
        assert (args.warmup_epochs, args.warmup_start, args.milestones, args.seed, args.clip) == (
            10, 0.01, [20, 25, 35], 42, "ViT-B/16")
        assert args.dataset == {"cuhk_pedes": "CUHK-PEDES", "icfg_pedes": "ICFG-PEDES", "rstpreid": "RSTPReid"}[name]
    else:
        assert (args.clip, args.clip_arch, args.ranking_weight, args.epochs) == ("none", "tiny", 0.0, 25)


def test_help_lists_every_setting(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert all(f"--{s.name}" in text for s in TRAIN_SETTINGS)


def test_resume_roles_run_settings_conflict_kept_ones_follow_the_command():
    saved = settings.as_dict(train.parse_args(["--batch_size", "16", "--epochs", "3", "--device", "cpu"]))
    args = train.parse_args(["--resume", "x.pt", "--device", "cuda", "--workers", "3", "--epochs", "5"])
    settings.apply_checkpoint(args, saved, "x.pt")
    assert (args.batch_size, args.epochs, args.device, args.workers) == (16, 5, "cuda", 3)  # extended, KEPT given
    args = train.parse_args(["--resume", "x.pt"])
    settings.apply_checkpoint(args, saved, "x.pt")
    assert (args.epochs, args.device, args.resume) == (3, "cpu", "x.pt")  # COMMAND settings stay the command's
    with pytest.raises(settings.SettingError, match="--seed 1 conflicts with the run being resumed \\(x.pt\\), which "
                                                    "has seed 42"):
        settings.apply_checkpoint(train.parse_args(["--resume", "x.pt", "--seed", "1"]), saved, "x.pt")
    with pytest.raises(settings.SettingError, match="x.pt: setting 'eval_every': 0 is not allowed"):
        settings.apply_checkpoint(train.parse_args(["--resume", "x.pt"]), {**saved, "eval_every": 0}, "x.pt")


def test_scripts_beside_train_py_check_their_flags_with_the_same_rules(capsys):
    import test as evaluate_script

    parser = evaluate_script.get_args_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["--checkpoint", "x.pt", "--device", "mps"])
    assert 'argument --device: "mps" is not allowed; device takes cpu, cuda or cuda:N' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["--checkpoint", "x.pt", "--batch_size", "0"])
    assert "batch_size takes an integer >= 1" in capsys.readouterr().err


TINY = ["--clip", "none", "--clip_arch", "tiny", "--image_size", "32", "32"]


def _tiny_run(argv, settings_args=None):
    """(model config, training output) of build_model from train.py flags, on one fixed batch and seed."""
    from engine.model_setup import build_model
    from tests.conftest import random_caption_ids

    args = settings_args or train.parse_args(TINY + argv)
    torch.manual_seed(0)
    model = build_model(args, num_classes=4).train()
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return model.config, model(images, random_caption_ids(8), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))


def test_every_loss_weight_setting_is_a_loss_terms_weight_and_reaches_the_loss(single_thread):
    from models.objectives import LOSS_TERMS

    terms = {term.weight: term for term in LOSS_TERMS.values()}
    assert [s.name for s in settings.LOSS_WEIGHTS] == list(terms)
    for s in settings.LOSS_WEIGHTS:  # the defaults agree
        default = terms[s.name].default
        assert s.default == (list(default) if isinstance(default, tuple) else default), s.name
    _, reference = _tiny_run([])
    for s in settings.LOSS_WEIGHTS:
        part = terms[s.name].name
        assert reference.losses[part] != 0, part
        config, out = _tiny_run([f"--{s.name}", *["0"] * (s.count or 1)])
        assert config.loss_weights[s.name] in (0.0, (0.0,) * (s.count or 1)) and getattr(config, s.name) == config.loss_weights[s.name]
        assert out.losses[part] == 0 and out.loss != reference.loss
        torch.testing.assert_close(out.loss, reference.loss - reference.losses[part], rtol=1e-5, atol=1e-6)


def test_a_new_loss_term_needs_its_function_and_its_setting_only(monkeypatch, single_thread):
    """Adding a loss as models/objectives.py says: a registered term and a loss-weight row (here patched in)."""
    from models import objectives
    from models.config import CFineConfig

    def text_norm(inputs, weight):
        return weight * inputs.text.norm(dim=-1).mean()

    monkeypatch.setitem(objectives.LOSS_TERMS, "text_norm", objectives.LossTerm("text_norm", "text_norm_weight", 0.5,
                                                                                text_norm))
    row = settings.Setting("text_norm_weight", 0.5, float, minimum=0, loss_weight=True)
    monkeypatch.setattr(settings, "LOSS_WEIGHTS", settings.LOSS_WEIGHTS + (row,))
    args = train.parse_args(TINY)
    args.text_norm_weight = 2.0
    config, out = _tiny_run([], args)
    assert config.loss_weights["text_norm_weight"] == 2.0 and config.to_dict()["text_norm_weight"] == 2.0
    assert CFineConfig.from_dict(config.to_dict()) == config
    torch.testing.assert_close(out.losses["text_norm"], 2.0 * out.text_features.norm(dim=-1).mean().detach())
    assert out.loss == sum(out.losses.values())
    # A checkpoint written before the term existed loads, the new weight at its default.
    stored = config.to_dict()
    del stored["text_norm_weight"]
    assert CFineConfig.from_dict(stored).loss_weights["text_norm_weight"] == 0.5


def test_every_clip_arch_choice_is_a_clip_config_and_its_patch_size_is_the_one_checked():
    from clip.config import CLIPConfig

    for arch in settings.CLIP_ARCHS:
        config = CLIPConfig.for_arch(arch, (64, 32))
        assert config.vision.image_size == (64, 32)
        assert settings.patch_size("none", arch) == CLIPConfig.for_arch(arch).vision.patch_size
    assert CLIPConfig.for_arch("vit_b16") == CLIPConfig.vit_b16() and CLIPConfig.for_arch("tiny") == CLIPConfig.tiny()


@pytest.mark.parametrize("where", ["flags", "config"])
def test_cfr_and_fcd_off_with_a_weighted_ranking_loss_is_one_line_before_any_work(where, tmp_path, capsys):
    if where == "flags":
        argv = ["--cfr", "off", "--fcd", "off"]
    else:
        (tmp_path / "c.json").write_text(json.dumps({"cfr": "off", "fcd": "off", "ranking_weight": 2}))
        argv = ["--config", str(tmp_path / "c.json")]
    line = parse_error(argv, capsys)
    weight = "10" if where == "flags" else "2"
    assert line.startswith("train.py: error: --cfr off with --fcd off leaves the ranking loss no similarity S, but "
                           f"--ranking_weight is {weight}: give --ranking_weight 0 (or turn one of them on)")
    args = train.parse_args(argv + ["--ranking_weight", "0"])
    assert (args.cfr, args.fcd, args.ranking_weight) == ("off", "off", 0.0)


def test_the_ablation_switches_reach_the_model_and_a_resume_keeps_them(single_thread):
    config, out = _tiny_run(["--mgf", "off", "--fcd", "off"])
    assert (config.mgf, config.cfr, config.fcd) == (False, True, False)
    assert out.image_features.shape[1] == 1 and out.losses["diversity"] == 0 and out.losses["ranking"] != 0
    config, _ = _tiny_run([])
    assert (config.mgf, config.cfr, config.fcd) == (True, True, True)
    saved = settings.as_dict(train.parse_args(["--mgf", "off"]))
    args = train.parse_args(["--resume", "x.pt"])
    settings.apply_checkpoint(args, saved, "x.pt")
    assert args.mgf == "off"
    with pytest.raises(settings.SettingError, match="--mgf on conflicts with the run being resumed"):
        settings.apply_checkpoint(train.parse_args(["--resume", "x.pt", "--mgf", "on"]), saved, "x.pt")
