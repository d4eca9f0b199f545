"""Every train.py setting in one table: type, allowed values, default and role.

Command-line flags and `--config` files are both checked against the table, before any work, with one line
naming the setting and what it allows; a config file holds only what differs from the defaults. Roles say
what `--resume` does with a setting:
- RUN defines the run (its numbers, its length, when it evaluates): taken from the checkpoint; a value
  given again that differs is an error, except a larger `--epochs`, which extends the run.
- KEPT says how this machine runs it (device, loader workers, the data's location): taken from the
  checkpoint unless given.
- COMMAND belongs to one command only (the config file, the checkpoint to resume, where to write).
So `python train.py --resume runs/x/last.pt` alone continues a run exactly as it would have gone on.

The table imports neither torch nor clip (whose package imports torch): `--help` reads it, and torch takes seconds
to import. The checks that need them (a --clip name, the patch size, the default device) import them when they run.
"""
from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from datasets import BENCHMARKS
from utils.errors import SettingError

RUN, KEPT, COMMAND = "run", "kept", "command"
COMMAND_LINE_ONLY = ("config", "resume", "overwrite")  # meaningless inside a config file
COMPILE_BACKENDS = ("off", "inductor", "aot_eager")
AMP_MODES = ("auto", "bf16", "fp16", "off")  # models/precision.py resolve_amp
CLIP_ARCHS = ("vit_b16", "tiny")  # CLIPConfig's constructors for --clip none




def _json(value: Any) -> str:
    return json.dumps(value, default=str)


# torch keeps a device index in 8 signed bits (torch.device("cuda:200") is cuda:-56) and a seed in 64 unsigned ones.
MAX_DEVICE_INDEX = 127
MAX_SEED = 2**64 - 1


def _device_problem(value: str) -> str | None:
    match = re.fullmatch(r"cpu|cuda(?::(\d+))?", value)
    if not match:
        return "cpu, cuda or cuda:N"
    if match.group(1) is not None and int(match.group(1)) > MAX_DEVICE_INDEX:
        return f"cpu, cuda or cuda:N with N a GPU index from 0 to {MAX_DEVICE_INDEX}"
    return None


def _increasing(values: list) -> str | None:
    return None if all(a < b for a, b in zip(values, values[1:])) else "strictly increasing epochs, e.g. [20, 25, 35]"


@dataclass(frozen=True)
class Setting:
    """One setting: its type (kind; count values if a list), the values it allows, its default and its role."""

    name: str
    default: Any
    kind: type = str  # of each value: str, int, float, or bool for a switch
    count: int | str | None = None  # None: one value; N: a list of exactly N; "*": a list of any length
    choices: tuple = ()
    minimum: float | None = None  # every value >= minimum
    above: float | None = None  # every value > above
    maximum: int | None = None  # every value <= maximum
    role: str = RUN
    help: str = ""
    group: str | None = None
    rule: Callable[[Any], str | None] | None = None  # a further rule; returns what is allowed when broken
    loss_weight: bool = False  # the weight of the CFine loss term that names it (models/objectives.py)
    needed_by: tuple[str, Any] | None = None  # (setting, value): a new run with that value needs this one given
    metavar: str | None = None  # the value's name in --help and messages

    def allowed(self) -> str:
        """What the setting accepts, in words."""
        if self.choices:
            each = "one of " + ", ".join(map(str, self.choices))
        else:
            each = " ".join(filter(None, [
                {int: "integer", float: "number", str: "string", bool: "true or false"}[self.kind],
                f">= {self.minimum:g}" if self.minimum is not None else "",
                f"> {self.above:g}" if self.above is not None else "",
                f"and <= {self.maximum}" if self.maximum is not None else ""]))
        if not (self.choices or self.kind is bool):
            each = ("an " if each[0] in "aeiou" else "a ") + each
        if self.count:
            each = f"{'a list' if self.count == '*' else f'a list of {self.count} values'}, each {each}"
        return each + (" (or null)" if self.default is None else "")

    def check(self, value: Any, source: str) -> Any:
        """The value in canonical form (lists as lists, ints accepted as floats), or SettingError naming source."""
        if value is None and self.default is None:
            return None
        values = value if self.count else [value]
        if self.count and (not isinstance(value, (list, tuple)) or (self.count != "*" and len(value) != self.count)):
            raise SettingError(f"{source}: {_json(value)} is not allowed; {self.name} takes {self.allowed()}")
        checked = [self._one(v, source, value) for v in values]
        if self.rule and (broken := self.rule(checked if self.count else checked[0])):
            raise SettingError(f"{source}: {_json(value)} is not allowed; {self.name} takes {broken}")
        return checked if self.count else checked[0]

    def _one(self, v: Any, source: str, whole: Any) -> Any:
        ok = isinstance(v, self.kind) and not (self.kind is not bool and isinstance(v, bool))
        if self.kind is float and isinstance(v, int) and not isinstance(v, bool):
            v, ok = float(v), True
        ok = ok and (self.kind is not float or math.isfinite(v))
        ok = ok and (not self.choices or v in self.choices)
        ok = ok and (self.minimum is None or v >= self.minimum) and (self.above is None or v > self.above)
        ok = ok and (self.maximum is None or v <= self.maximum)
        if not ok:
            raise SettingError(f"{source}: {_json(whole)} is not allowed; {self.name} takes {self.allowed()}")
        return v


_LOSS = "CFine loss weights (defaults: the authors'; for ablations and the from-scratch demo)"
_ABLATION = "CFine ablations (defaults: the paper's model; configs/ablations/)"
_DDP = "several processes (torchrun); no effect in a single process"

# The defaults are the authors' CUHK-PEDES recipe (docs/method.md §6).
TRAIN_SETTINGS = (
    Setting("config", None, role=COMMAND, help="JSON file of settings that differ from the defaults; flags override it"),
    Setting("dataset", "CUHK-PEDES", choices=tuple(BENCHMARKS)),
    Setting("data_root", None, role=KEPT,
            help="folder that data.sh wrote <dataset>/ into (default: processed_data; on --resume: the run's)"),
    Setting("clip", "ViT-B/16",
            help="pretrained CLIP: a released name (ViT-B/16, ...), a checkpoint path, or 'none' for random weights"),
    Setting("clip_arch", "vit_b16", choices=CLIP_ARCHS,
            help="architecture built when --clip none (tiny: the CPU demo's small CLIP-shaped model)"),
    Setting("text_encoder", "clip", choices=("clip", "bert"),
            help="clip: CLIP's text tower, D=512 (the project's default); bert: the authors' release (docs/method.md §9), "
                 "BERT-base text and unprojected 768-d image tokens (needs --bert and requirements-bert.txt)"),
    Setting("bert", None, role=COMMAND, needed_by=("text_encoder", "bert"), metavar="FOLDER",
            help="bert-base-uncased in Hugging Face layout (config.json, vocab.txt, model.safetensors or "
                 "pytorch_model.bin); read only to start a run (checkpoints carry it)"),
    Setting("output_dir", None, role=COMMAND,
            help="default: runs/<dataset> (e.g. runs/cuhk_pedes); on --resume: the checkpoint's folder. A new run "
                 "needs it empty (or --overwrite)"),
    Setting("overwrite", False, bool, role=COMMAND,
            help="start a new run in a non-empty --output_dir, deleting the run files there (last.pt, best.pt, ...)"),
    Setting("image_size", [224, 224], int, count=2, minimum=1,
            help="H W in pixels, each a multiple of the patch size"),
    Setting("mean_std", "clip", choices=("clip", "imagenet"), help="image normalisation"),
    Setting("batch_size", 32, int, minimum=2, help="per process: under torchrun the global batch is batch_size x processes"),
    Setting("epochs", 50, int, minimum=1, help="on --resume a larger value extends the run"),
    Setting("lr_head", 1e-4, float, minimum=0, help="new modules, BN and the CMPC classifier"),
    Setting("lr_image", 1e-5, float, minimum=0),
    Setting("lr_text", 1e-5, float, minimum=0),
    Setting("wd_image", 4e-5, float, minimum=0),
    Setting("warmup_epochs", 10, int, minimum=0),
    Setting("warmup_start", 0.01, float, above=0),
    Setting("milestones", [20, 25, 35], int, count="*", minimum=1, rule=_increasing),
    Setting("gamma", 0.1, float, above=0),
    Setting("cmpm_weights", [1.0, 1.0, 0.1], float, count=3, minimum=0, group=_LOSS, loss_weight=True,
            help="global, lg1, lg2"),
    Setting("cmpc_weights", [1.0, 1.0, 1.0], float, count=3, minimum=0, group=_LOSS, loss_weight=True,
            help="global, lg1, lg2"),
    Setting("diversity_weight", 0.2, float, minimum=0, group=_LOSS, loss_weight=True),
    Setting("ranking_weight", 10.0, float, minimum=0, group=_LOSS, loss_weight=True),
    Setting("margin", 0.2, float, minimum=0, group=_LOSS),
    Setting("mgf", "on", choices=("on", "off"), group=_ABLATION,
            help="off: no MGF block and no local-global features; retrieval, CMPM and CMPC use the global feature "
                 "alone and the diversity loss is off"),
    Setting("cfr", "on", choices=("on", "off"), group=_ABLATION,
            help="off: the ranking loss's similarity S loses CFR's sim_cs"),
    Setting("fcd", "on", choices=("on", "off"), group=_ABLATION,
            help="off: the ranking loss's similarity S loses FCD's sim_cd (with --cfr off too, --ranking_weight "
                 "must be 0)"),
    Setting("gather_features", False, bool, group=_DDP,
            help="CMPM and the ranking loss (with its CFR/FCD similarities) see the global batch through a "
                 "gradient-preserving all-gather; default: each process uses its own batch"),
    Setting("sync_bn", False, bool, group=_DDP,
            help="the BN bottlenecks normalise with the global batch's statistics (with --gather_features: the "
                 "same loss and update as one process on the whole global batch)"),
    Setting("chunk_size", None, int, minimum=1, role=KEPT,
            help="gradient caching: encode the batch this many pairs at a time, for the memory of a smaller batch; "
                 "the losses still see the whole batch, so loss and gradients are unchanged (bert mode: other "
                 "dropout masks); each chunk is encoded twice, so steps take longer (default: off, the whole batch "
                 "at once, as is a chunk size equal to the batch)"),
    Setting("tf32", "off", choices=("on", "off"),
            help="CUDA float32 matrix products as TF32 (the authors' fp32 run was one: on in the *_paper.json "
                 "configs); no effect on CPU"),
    Setting("amp", "auto", choices=AMP_MODES,
            help="auto: bf16 on GPUs that support it, fp16 (with a GradScaler) on older GPUs, off on CPU"),
    Setting("compile", "off", choices=COMPILE_BACKENDS, role=KEPT,
            help="torch.compile the training step's model and the evaluation encoders with this backend "
                 "(inductor: the fast one; aot_eager: traces the same graphs without code generation, for checks)"),
    Setting("device", None, role=KEPT, rule=_device_problem,
            help="cpu, cuda or cuda:N (default: cuda when a GPU is visible, else cpu)"),
    Setting("workers", None, int, minimum=0, role=KEPT,
            help="data loader processes per training process (default: the node's cores shared among its training "
                 "processes, minus one for each)"),
    Setting("seed", 42, int, minimum=0, maximum=MAX_SEED),
    Setting("eval_every", 1, int, minimum=1, help="evaluate every N epochs (and after the last)"),
    Setting("select_on", "val", choices=("val", "test"),
            help="the split that evaluates during training and selects best.pt: val (a dataset without one, "
                 "ICFG-PEDES, holds out about 5 percent of its training ids as val, from --seed); test only on request "
                 "(the numbers are then not honest test results)"),
    Setting("eval_batch_size", 128, int, minimum=1, role=KEPT),
    Setting("eval_at_start", False, bool,
            help="also evaluate the model before training (recorded as epoch 0: the untrained baseline)"),
    Setting("resume", None, role=COMMAND,
            help="a last.pt/best.pt written by train.py: continue that run exactly, with its own settings"),
    Setting("max_nonfinite", 50, int, minimum=1, role=KEPT,
            help="abort after this many steps in a row undone for a non-finite loss or non-finite weights"),
    Setting("no_progress", False, bool, role=COMMAND, help="no progress bars (logs only)"),
    Setting("tensorboard", False, bool, role=KEPT,
            help="also write TensorBoard logs to <output_dir>/tb/ (needs: pip install tensorboard)"),
    Setting("log_every", 50, int, minimum=1, role=KEPT,
            help="with --tensorboard: the training loss every N steps (read only at those steps)"),
)
TABLE = {s.name: s for s in TRAIN_SETTINGS}
LOSS_WEIGHTS = tuple(s for s in TRAIN_SETTINGS if s.loss_weight)  # engine/model_setup.py gives them to CFineConfig
ABLATION_SWITCHES = tuple(s.name for s in TRAIN_SETTINGS if s.group == _ABLATION)  # mgf, cfr, fcd
# What a row of an ablation table sets (configs/ablations/; scripts/ablations.py keeps them the row's under --base).
ABLATION_KEYS = tuple(s.name for s in TRAIN_SETTINGS if s.group in (_ABLATION, _LOSS))


class _OneLineErrors(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage block): 'train.py: error: ...', exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (python {self.prog} --help lists every setting)\n")


def get_args_parser(description: str) -> argparse.ArgumentParser:
    """The flags of TRAIN_SETTINGS (--eval_every, with --eval-every as an alias); only flags given on the command
    line appear in the parsed namespace."""
    parser = _OneLineErrors(prog="train.py", description=description, argument_default=argparse.SUPPRESS)
    groups: dict[str | None, Any] = {None: parser}
    for s in TRAIN_SETTINGS:
        target = groups.setdefault(s.group, s.group and parser.add_argument_group(s.group))
        default = "" if s.default in (None, False) else f" (default: {s.default})"
        needed = f"with --{s.needed_by[0]} {s.needed_by[1]}: " if s.needed_by else ""
        flags = [f"--{s.name}", f"--{s.name.replace('_', '-')}"] if "_" in s.name else [f"--{s.name}"]
        if s.kind is bool:
            target.add_argument(*flags, action="store_true", help=s.help)
            continue
        metavar = "{" + ",".join(s.choices) + "}" if s.choices else s.metavar
        nargs = s.count if s.count else None
        target.add_argument(*flags, type=s.kind, nargs=nargs, metavar=metavar, help=needed + s.help + default)
    return parser


def _no_repeated_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json's object_pairs_hook: an object whose keys are all different (json.loads keeps the last of a repeated
    key silently)."""
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"key {key!r} is given twice; keep one")
        seen[key] = value
    return seen


def read_config(path: str) -> dict[str, Any]:
    """A --config file's settings, each checked against the table."""
    try:
        values = json.loads(Path(path).read_text(encoding="utf-8"), object_pairs_hook=_no_repeated_keys)
    except (OSError, ValueError) as error:
        raise SettingError(f"--config {path}: {error}") from None
    except RecursionError:
        raise SettingError(f"--config {path}: nested too deeply to be a settings file (expected a JSON object of "
                           "settings)") from None
    if not isinstance(values, dict):
        raise SettingError(f"--config {path}: expected a JSON object of settings, found {type(values).__name__}")
    checked = {}
    for key, value in values.items():
        if key not in TABLE or key in COMMAND_LINE_ONLY:
            why = "is a command-line flag only" if key in TABLE else "is not a train.py setting"
            raise SettingError(f"--config {path}: key {key!r} {why} (python train.py --help lists them)")
        checked[key] = TABLE[key].check(value, f"--config {path}: {json.dumps(key)}")
    return checked


def parse(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Defaults < --config file < flags, every value checked; `args._given` maps each setting given to its source."""
    flags = vars(parser.parse_args(argv))
    values = {s.name: s.default for s in TRAIN_SETTINGS}
    given: dict[str, str] = {}
    try:
        if flags.get("config"):
            for key, value in read_config(flags["config"]).items():
                values[key], given[key] = value, f"--config {flags['config']}: {json.dumps(key)}"
        for key, value in flags.items():
            values[key], given[key] = TABLE[key].check(value, f"--{key}"), f"--{key}"
        if not values["resume"]:
            check_new_run(values)
            check_chunk_size(values, "")
    except SettingError as error:
        parser.error(str(error))
    values["device"] = values["device"] or default_device()
    args = argparse.Namespace(**values)
    args._given = given
    return args


def default_device() -> str:
    """--device when not given: cuda when a GPU is visible, else cpu."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def patch_size(clip: str, clip_arch: str) -> int | None:
    """The patch size a --clip/--clip_arch pair implies; None for a checkpoint path (known once it is read)."""
    from clip.config import CLIPConfig
    from clip.loading import RELEASED

    if clip.lower() == "none":
        return CLIPConfig.for_arch(clip_arch).vision.patch_size
    match = re.search(r"/(\d+)", clip) if clip in RELEASED else None
    return int(match.group(1)) if match else None


def check_new_run(values: dict[str, Any]) -> None:
    """Rules between settings of a new run: a similarity S for a weighted ranking loss, each setting that another's
    value needs (bert mode: --bert), an image size the patches tile, a --clip that exists."""
    if values["cfr"] == values["fcd"] == "off" and values["ranking_weight"] > 0:
        raise SettingError(f"--cfr off with --fcd off leaves the ranking loss no similarity S, but --ranking_weight is "
                           f"{values['ranking_weight']:g}: give --ranking_weight 0 (or turn one of them on)")
    for s in TRAIN_SETTINGS:
        if s.needed_by and values[s.needed_by[0]] == s.needed_by[1] and not values[s.name]:
            key, value = s.needed_by
            raise SettingError(f"--{key} {value} needs --{s.name} {s.metavar or s.name.upper()}: {s.help}")
    from clip.loading import RELEASED

    clip = values["clip"]
    if clip.lower() != "none" and clip not in RELEASED and not Path(clip).is_file():
        raise SettingError(f"--clip {clip}: no such file; clip takes a released name ({', '.join(RELEASED)}), "
                           "a checkpoint path, or none")
    patch = patch_size(clip, values["clip_arch"])
    if patch and any(side % patch for side in values["image_size"]):
        raise SettingError(image_size_problem(values["image_size"], patch, clip))


def check_chunk_size(values: dict[str, Any], source: str) -> None:
    """A --chunk_size no larger than the per-process batch (it divides the batch; the last chunk may be smaller)."""
    chunk, batch = values["chunk_size"], values["batch_size"]
    if chunk is not None and chunk > batch:
        raise SettingError(f"{source}--chunk_size {chunk} is larger than the batch ({batch} per process): give a chunk "
                           f"size from 1 to {batch}, or drop --chunk_size to encode the whole batch at once")


def image_size_problem(image_size: list[int], patch: int, clip: str) -> str:
    """The one-line message for an image size the patch grid does not tile."""
    fixed = " ".join(str(max(patch, round(side / patch) * patch)) for side in image_size)
    return (f"--image_size {image_size[0]} {image_size[1]} is not allowed; image_size takes multiples of the patch "
            f"size {patch} of --clip {clip} (e.g. {fixed})")


def flag_type(setting: Setting) -> Callable[[str], Any]:
    """An argparse `type` that converts and checks one value against a setting (for scripts beside train.py)."""
    def convert(text: str) -> Any:
        try:
            return setting.check(setting.kind(text), f"--{setting.name}")
        except (SettingError, ValueError) as error:
            raise argparse.ArgumentTypeError(str(error).removeprefix(f"--{setting.name}: ")) from None
    return convert


def as_dict(args: argparse.Namespace) -> dict[str, Any]:
    """Every setting's value, as stored in checkpoints and config.json."""
    return {s.name: getattr(args, s.name) for s in TRAIN_SETTINGS}


def apply_checkpoint(args: argparse.Namespace, saved: dict[str, Any], checkpoint: str) -> None:
    """Give args the resumed run's settings (RUN and, unless given, KEPT ones) or raise SettingError on a conflict."""
    given = getattr(args, "_given", {})
    for s in TRAIN_SETTINGS:
        if s.role == COMMAND or s.name not in saved:
            continue
        value = s.check(saved[s.name], f"{checkpoint}: setting {s.name!r}")
        if s.name not in given:
            setattr(args, s.name, value)
        elif s.role == RUN and getattr(args, s.name) != value:
            mine = getattr(args, s.name)
            if s.name == "epochs" and mine > value:
                continue  # extends the run
            hint = " (a resumed run can only be extended: give a larger value)" if s.name == "epochs" else ""
            raise SettingError(
                f"{given[s.name]} {_shown(mine)} conflicts with the run being resumed ({checkpoint}), which has "
                f"{s.name} {_shown(value)}{hint}; drop it to continue that run, or start a new run "
                "(another --output_dir, or --overwrite)")
    check_chunk_size(vars(args), f"--resume {checkpoint}: ")


def _shown(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)

