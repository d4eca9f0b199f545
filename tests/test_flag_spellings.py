"""Flags are spelled one way (underscores, like train.py) in every entry point; the hyphen spelling is an alias."""
import importlib

import pytest

import test as evaluate_script
import train

ENTRY_POINTS = ["train", "test", "datasets.prepare", "datasets.synthetic.generate", "scripts.seeds", "benchmarks.head_speed",
                "benchmarks.rank_speed", "benchmarks.train_throughput", "benchmarks.encoder_speed"]


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_every_multi_word_flag_has_the_underscore_name_and_the_hyphen_alias(module):
    parser = importlib.import_module(module).get_args_parser()
    for action in parser._actions:
        longs = [o for o in action.option_strings if o.startswith("--")]
        if not any(("_" in o or "-" in o[2:]) for o in longs):
            continue
        assert longs[0] == "--" + action.dest and "-" not in action.dest, longs  # the underscore spelling first
        assert longs[1:] == ["--" + action.dest.replace("_", "-")], longs


def test_hyphen_spellings_parse_to_the_same_settings(tmp_path):
    underscores = train.parse_args(["--eval_every", "3", "--select_on", "test", "--image_size", "64", "32",
                                    "--no_progress", "--clip", "none", "--clip_arch", "tiny"])
    hyphens = train.parse_args(["--eval-every", "3", "--select-on", "test", "--image-size", "64", "32",
                                "--no-progress", "--clip", "none", "--clip-arch", "tiny"])
    assert vars(underscores) == vars(hyphens)
    a = evaluate_script.get_args_parser().parse_args(["--checkpoint", "x.pt", "--data-root", "d", "--no-progress",
                                                      "--batch-size", "4", "--output-dir", "o"])
    assert (a.data_root, a.no_progress, a.batch_size, a.output_dir) == ("d", True, 4, "o")
    prepare = importlib.import_module("datasets.prepare").get_args_parser()
    assert prepare.parse_args(["root", "--skip-bad-images"]).skip_bad_images
    synthetic = importlib.import_module("datasets.synthetic.generate").get_args_parser()
    assert synthetic.parse_args(["--out", "o", "--format", "RSTPReid", "--images-per-id", "2"]).images_per_id == 2
