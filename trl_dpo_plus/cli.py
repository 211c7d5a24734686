"""`trl-dpo-plus`: the command line, shaped like `trl dpo`.

    trl-dpo-plus train --model_name_or_path Qwen/Qwen3-0.6B --dataset_name pairs.jsonl --loss_type simpo --qlora
    trl-dpo-plus train --config recipe.yaml                       (TRL's YAML recipes, `datasets:` mixtures included)
    trl-dpo-plus train --config recipe.yaml --accelerate_config zero3 --num_processes 8   (through accelerate launch)
    trl-dpo-plus compare --model_name_or_path ... --dataset_name pairs.jsonl --test_split_size 0.1 \
        --loss_type sigmoid ipo:beta=0.5 simpo [--reward_fn my_rewards:score]   one run per loss, one table
    trl-dpo-plus iterate --model_name_or_path ... --dataset_name prompts.jsonl --reward_fn my_rewards:score \
        --rounds 3 --samples_per_prompt 8 [--reference previous]   on-policy rounds: sample, score, pair, train
    trl-dpo-plus losses                      the registry: names, data kind, reference-free, defaults, papers
    trl-dpo-plus report out/                 a run's diagnostics in words (flags, margins, displacement); plot rebuilt
    trl-dpo-plus sample out/ --prompt "..."  the adapter's completion beside the base's
    trl-dpo-plus merge out/ merged/          the base with the adapter merged in (its own dtype), tokenizer and card
    trl-dpo-plus demo [--losses sigmoid simpo ...]
    trl-dpo-plus run my_trl_dpo_script.py --loss_type simpo ...   an unchanged TRL script with our trainer
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import functools
import logging
import os
import re
import sys
import warnings
from typing import NoReturn

from .assets import EMBEDDED_MODEL  # the embedded model's alias (`run` reads it too)

COMMANDS = ("train", "compare", "iterate", "losses", "report", "sample", "merge", "demo", "run")
LAUNCHED_ENV = "TRL_DPO_PLUS_LAUNCHED"  # set for the processes `accelerate launch` starts, so they do not launch again
LORA_FLAGS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_modules_to_save", "use_rslora",
              "use_dora")
QLORA_FLAGS = ("bnb_4bit_quant_type", "use_bnb_nested_quant", "bnb_4bit_quant_storage")


def make_train_parser(prog: str = "trl-dpo-plus train", extra: tuple = ()):
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser

    from .config import DPOPlusConfig
    from .losses import list_losses

    parser = TrlParser((ScriptArguments, DPOPlusConfig, ModelConfig, DatasetMixtureConfig, *extra), prog=prog)
    for action in parser._actions:  # choices from the registry as it is now (plugins included)
        if action.dest == "loss_type":
            action.choices = list_losses()
    parser.error = functools.partial(short_error, parser.prog)
    parser.epilog = ("Launch options, passed to `accelerate launch` (one process without them): --accelerate_config "
                     "NAME|FILE (TRL's zero1, zero2, zero3, fsdp1, fsdp2, multi_gpu, single_gpu, or a YAML), "
                     "--num_processes N, --num_machines N, --main_process_port PORT, and accelerate launch's other "
                     "flags. --debug: tracebacks instead of one-line errors.")
    return parser


def short_error(prog: str, message: str) -> NoReturn:
    """argparse's error without the usage (200 lines of options; `--help` has them): the offending part and a fix,
    a did-you-mean from the registry for `--loss_type`, exit 2."""
    match = re.search(r"argument --loss_type[^:]*: invalid choice: '([^']*)'", message)
    if match:
        from .losses import get_loss

        try:
            get_loss(match.group(1))
        except (KeyError, ValueError) as err:
            message = f"--loss_type: {str(err).strip(chr(39))}"
    sys.stderr.write(f"{prog}: error: {message}\n(every option: {prog} --help)\n")
    sys.exit(2)


def explicit_options(argv: list[str]) -> set[str]:
    """The option names the user set, on the command line or in the `--config` YAML (a preset yields to them)."""
    import yaml

    names = {arg[2:].split("=", 1)[0].replace("-", "_") for arg in argv if arg.startswith("--")}
    if "--config" in argv and argv.index("--config") + 1 < len(argv):
        with open(argv[argv.index("--config") + 1]) as file:
            names |= set(yaml.safe_load(file) or {})
    return names


class _CurrentStderr(logging.StreamHandler):
    """A handler writing to whatever `sys.stderr` is when a record is emitted (not the one at set-up, which a
    notebook or a test harness may have replaced and closed since)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _quiet_console() -> None:
    """Our notices as one-line messages; upstream deprecation warnings a user cannot act on, silenced."""
    # TRL's DPOConfig sets `gradient_checkpointing`, which Transformers 5 renamed: nothing for the user to change.
    warnings.filterwarnings("ignore", message=r".*gradient_checkpointing.*deprecated", category=FutureWarning)
    package = logging.getLogger("trl_dpo_plus")
    if int(os.environ.get("RANK", "0")) != 0:  # one copy of each notice: the main process's
        package.setLevel(logging.ERROR)
        return
    if not package.handlers:
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("trl-dpo-plus: %(message)s"))
        package.addHandler(handler)
    package.setLevel(logging.INFO)


def _check_launch_args(parser, remaining: list[str]) -> None:
    """The leftover arguments must be `accelerate launch`'s (`--num_processes`, `--accelerate_config`, ...)."""
    if not remaining:
        return
    from accelerate.commands.launch import launch_command_parser

    launcher = launch_command_parser()
    options = {o for action in launcher._actions for o in action.option_strings} | {"--accelerate_config"}
    unknown, inside_unknown = [], True  # a value before any option is unknown too
    for arg in remaining:
        if arg.startswith("-"):
            inside_unknown = arg.split("=", 1)[0] not in options
        if inside_unknown:
            unknown.append(arg)
    if unknown:
        flags = [a for a in unknown if a.startswith("-")] or unknown
        known = [o for action in parser._actions for o in action.option_strings] + sorted(options)
        close = difflib.get_close_matches(flags[0], known, n=1)
        parser.error(f"unrecognized arguments: {' '.join(unknown)}" + (f" (did you mean {close[0]}?)" if close else ""))


def _launch(parser, launch_args: list[str], train_argv: list[str]) -> int:
    """Run this same `train` command in the processes `accelerate launch` starts, with TRL's shipped configs."""
    from accelerate.commands.launch import launch_command, launch_command_parser
    from trl.cli.accelerate_config import resolve_accelerate_config_argument

    try:
        launch_args = resolve_accelerate_config_argument(launch_args)
    except ValueError as err:
        parser.error(f"--accelerate_config: {err} TRL ships: zero1, zero2, zero3, fsdp1, fsdp2, multi_gpu, single_gpu.")
    os.environ[LAUNCHED_ENV] = "1"
    command = launch_command_parser().parse_args([*launch_args, "--module", "trl_dpo_plus.cli", "train", *train_argv])
    launch_command(command)
    return 0


def _without(argv: list[str], remaining: list[str]) -> list[str]:
    """`argv` minus the ordered subsequence `remaining` (the launcher's arguments)."""
    rest, out = iter(remaining), []
    current = next(rest, None)
    for arg in argv:
        if current is not None and arg == current:
            current = next(rest, None)
        else:
            out.append(arg)
    return out


def load_datasets(parser, script_args, training_args, dataset_args, need_eval: bool = False):
    """The `DatasetDict` to train on: a `datasets:` mixture (TRL's `get_dataset`) or `--dataset_name`, with
    `--streaming` and `--test_split_size`; every problem is a parser error before any model is loaded."""
    from datasets import DatasetDict
    from trl import get_dataset

    from .data import check_preference_dataset, load_preference_dataset

    streaming = bool(script_args.dataset_streaming or dataset_args.streaming)
    if streaming and dataset_args.test_split_size:
        parser.error("--test_split_size needs the whole dataset; it cannot split a streamed one (drop --streaming, or "
                     "use a dataset with a test split and --dataset_test_split)")
    if streaming and training_args.max_steps <= 0:
        parser.error("a streamed dataset has no length, so the run needs --max_steps")
    try:
        if dataset_args.datasets:
            if script_args.dataset_name:
                logging.getLogger(__name__).info("Both datasets: and --dataset_name: training on the datasets: mixture")
            dataset_args.streaming = streaming
            dataset = get_dataset(dataset_args)
        elif script_args.dataset_name:
            dataset = load_preference_dataset(script_args.dataset_name, script_args.dataset_config, streaming=streaming)
            if dataset_args.test_split_size:
                split = dataset[script_args.dataset_train_split].train_test_split(
                    test_size=dataset_args.test_split_size, seed=training_args.seed)
                dataset = DatasetDict({script_args.dataset_train_split: split["train"],
                                       script_args.dataset_test_split: split["test"]})
        else:
            parser.error("a dataset is required: --dataset_name (a local file or folder, or a Hub dataset id) or a "
                         "`datasets:` mixture in the --config YAML")
    except (FileNotFoundError, ValueError, KeyError) as err:
        parser.error(str(err).strip("'\""))
    name = script_args.dataset_name or "the datasets: mixture"
    needed = [(script_args.dataset_train_split, "--dataset_train_split")]  # each split and the fix when it is missing
    if need_eval:
        needed.append((script_args.dataset_test_split, "--dataset_test_split, or --test_split_size 0.1 to hold out "
                       "part of the train split: compare scores every run on held-out pairs"))
    elif training_args.eval_strategy != "no":
        needed.append((script_args.dataset_test_split, "--dataset_test_split or --test_split_size 0.1 to hold out part "
                       "of the train split, or --eval_strategy no"))
    for split, fix in needed:
        if split not in dataset:
            parser.error(f"{name} has no split {split!r}; it has {list(dataset)}. Set {fix}")
    try:
        for split, _ in needed:
            dataset[split] = check_preference_dataset(
                dataset[split], name=split, kind=training_args.data_kind, losses=list(training_args.loss_type),
                unpair=training_args.unpair, seed=training_args.seed)
    except (ValueError, TypeError) as err:
        parser.error(f"{name}: {err}")
    return dataset


def mixture_names(dataset_args) -> list[str]:
    """What the card calls each mixture entry: its Hub id or folder, or, for a builder such as `json` given
    `data_files`, the files (a builder's name is not a dataset)."""
    names = []
    for entry in dataset_args.datasets:
        files = entry.data_files
        if files is None:
            names.append(entry.path)
            continue
        for group in (files.values() if isinstance(files, dict) else [files]):
            names.extend([group] if isinstance(group, str) else group)
    return names


def _peft_and_quantization(script_argv: list[str], training_args, model_args):
    """LoRA/QLoRA configs: the `--lora`/`--qlora` preset with every explicitly given flag applied over it, or TRL's
    own `--use_peft`/`--load_in_4bit` path."""
    from trl import get_peft_config, get_quantization_config

    if not (training_args.qlora or training_args.lora):
        return get_peft_config(model_args), get_quantization_config(model_args)
    from .qlora import lora_defaults, qlora_defaults

    given = explicit_options(script_argv)
    peft_config = lora_defaults(**{k: getattr(model_args, k) for k in LORA_FLAGS if k in given})
    if not training_args.qlora:
        return peft_config, None
    bnb_kwargs = {k: getattr(model_args, k) for k in QLORA_FLAGS if k in given}
    if "dtype" in given and model_args.dtype not in (None, "auto"):
        bnb_kwargs["bnb_4bit_compute_dtype"] = model_args.dtype
    return peft_config, qlora_defaults(**bnb_kwargs)[0]


def _parse(parser, argv: list[str]):
    try:
        return parser.parse_args_and_config(argv, return_remaining_strings=True, separate_remaining_strings=True)
    except (ValueError, TypeError, OSError) as err:  # the configs' own checks, a YAML that cannot be read
        parser.error(str(err))


def _resolve_model(parser, model_args, training_args) -> None:
    if model_args.model_name_or_path is None:
        parser.error(f"--model_name_or_path is required: a Hub model id or a local folder. To try trl-dpo-plus on the "
                     f"embedded 260K-parameter toy model, pass --model_name_or_path {EMBEDDED_MODEL} or run "
                     "`trl-dpo-plus demo`")
    if model_args.model_name_or_path == EMBEDDED_MODEL:
        from .assets import default_model_path

        model_args.model_name_or_path = default_model_path()
    model_init_kwargs = {"revision": model_args.model_revision, "attn_implementation": model_args.attn_implementation,
                         "dtype": model_args.dtype, **(training_args.model_init_kwargs or {})}
    training_args.model_init_kwargs = {k: v for k, v in model_init_kwargs.items() if v is not None}


def train(argv: list[str]) -> int:
    _quiet_console()
    debug = "--debug" in argv  # tracebacks instead of the one-line errors
    argv = [a for a in argv if a != "--debug"]
    parser = make_train_parser()
    *parsed, config_remaining, cli_remaining = _parse(parser, argv)
    script_args, training_args, model_args, dataset_args = parsed
    launch_args = config_remaining + cli_remaining
    _check_launch_args(parser, launch_args)
    if launch_args and not os.environ.get(LAUNCHED_ENV):
        return _launch(parser, launch_args, _without(argv, cli_remaining))
    _resolve_model(parser, model_args, training_args)
    resume = _resume_target(parser, training_args)
    dataset = load_datasets(parser, script_args, training_args, dataset_args)

    from .saving import nonfinite_weights
    from .trainer import DPOPlusTrainer

    peft_config, quantization_config = _peft_and_quantization(argv, training_args, model_args)
    dataset_name = script_args.dataset_name or mixture_names(dataset_args)
    with _one_line_errors(parser, debug, "building the trainer"):  # the model, the data, the Hub: before training
        trainer = DPOPlusTrainer(
            model=model_args.model_name_or_path, args=training_args,
            train_dataset=dataset[script_args.dataset_train_split],
            eval_dataset=dataset[script_args.dataset_test_split] if training_args.eval_strategy != "no" else None,
            quantization_config=quantization_config, peft_config=peft_config,
        )
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(training_args.output_dir)
    trainer.create_model_card(dataset_name=dataset_name)
    written = [name for name in ("README.md", "diagnostics.json", "diagnostics.png")
               if os.path.exists(os.path.join(training_args.output_dir, name))]
    trainer.accelerator.print(f"Saved to {training_args.output_dir}" + (f" ({', '.join(written)})" if written else ""))
    nonfinite = nonfinite_weights(trainer.accelerator.unwrap_model(trainer.model))
    if nonfinite:  # the default diagnostics_action='warn' lets a diverged run finish: never a silent exit 0
        trainer.accelerator.print(f"error: the final weights hold NaN or infinity in {len(nonfinite)} tensors (e.g. "
                                  f"{nonfinite[0]}): the run diverged and the saved model is not usable (the card says "
                                  "so). Train again with a lower learning rate, or --diagnostics_action checkpoint.")
    elif training_args.push_to_hub:
        with _one_line_errors(parser, debug, "pushing to the Hub (the trained model is saved)"):
            trainer.push_to_hub(dataset_name=dataset_name)
        trainer.accelerator.print(f"Pushed to https://huggingface.co/{trainer.hub_model_id}")
    trainer.end()
    return 1 if nonfinite else 0


@contextlib.contextmanager
def _one_line_errors(parser, debug: bool, stage: str):
    """A config, data, model or Hub error as `prog: error: ...` and exit 2; the traceback with `--debug`."""
    try:
        yield
    except (ValueError, TypeError, OSError, RuntimeError, ImportError) as err:
        if debug:
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        short_error(parser.prog, f"{stage}: {type(err).__name__}: {message[:600]} (--debug shows the traceback)")


def _resume_target(parser, training_args) -> str | None:
    """`--resume_from_checkpoint`: a checkpoint folder, or `true` for the last one in `output_dir` (as in
    Transformers' example scripts); checked before anything loads."""
    value = training_args.resume_from_checkpoint
    if value is None or str(value).lower() == "false":
        return None
    if str(value).lower() == "true":
        from transformers.trainer_utils import get_last_checkpoint

        output_dir = training_args.output_dir
        last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        if last is None:
            parser.error(f"--resume_from_checkpoint true: there is no checkpoint-N folder in --output_dir {output_dir} "
                         "to resume from. Drop the flag to start a new run, or name a checkpoint folder.")
        return last
    if not os.path.isfile(os.path.join(value, "trainer_state.json")):
        parser.error(f"--resume_from_checkpoint {value}: not a checkpoint folder (no trainer_state.json there). "
                     "Name a checkpoint-N folder, or pass true for the last one in --output_dir.")
    return value


@dataclasses.dataclass
class CompareArguments:
    """`trl-dpo-plus compare`'s own options (every `train` option applies to each run)."""

    reward_fn: str | None = dataclasses.field(default=None, metadata={
        "help": "module:function (or file.py:function) scoring completions, TRL-style: fn(prompts=[...], "
                "completions=[...]) -> list[float]. Adds win-rate vs the base, mean reward and fluency from samples "
                "on held-out prompts."})
    generation_prompts: int = dataclasses.field(default=16, metadata={
        "help": "With --reward_fn: how many distinct held-out prompts to sample on."})
    samples_per_prompt: int = dataclasses.field(default=4, metadata={"help": "With --reward_fn: samples per prompt."})
    max_new_tokens: int = dataclasses.field(default=64, metadata={"help": "With --reward_fn: tokens per sample."})
    rescore: str | None = dataclasses.field(default=None, metadata={
        "help": "A finished comparison's folder: score its saved runs again (e.g. with a new --reward_fn) without "
                "training them; runs missing there are trained. Sets --output_dir."})
    share_reference: bool = dataclasses.field(default=True, metadata={
        "help": "Compute the reference log-probs once for every run (in --reference_cache_dir, default "
                "<output_dir>/reference_cache); false gives each run its own pass."})


def _take_loss_specs(argv: list[str]) -> tuple[list[str], list[str]]:
    """The `--loss_type` values (each `name` or `name:key=value,...`), and `argv` without them."""
    specs, rest, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--loss_type" or arg.startswith("--loss_type="):
            if "=" in arg:
                specs.append(arg.split("=", 1)[1])
            i += 1
            while i < len(argv) and not argv[i].startswith("--"):
                specs.append(argv[i])
                i += 1
            continue
        rest.append(arg)
        i += 1
    return specs, rest


def _option_value(argv: list[str], flag: str) -> str | None:
    """The value given to `flag` in `argv` (`--flag v` or `--flag=v`), or `None`."""
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def compare_command(argv: list[str]) -> int:
    _quiet_console()
    parser = make_train_parser("trl-dpo-plus compare", extra=(CompareArguments,))
    from .compare import RewardFnError, compare, load_reward_fn, markdown_table, parse_run
    from .losses import get_loss

    specs, argv = _take_loss_specs(argv)
    if not specs and "--config" in argv:  # a recipe's `loss_type:` list, one run each
        import yaml

        with open(argv[argv.index("--config") + 1]) as file:
            listed = (yaml.safe_load(file) or {}).get("loss_type") or []
        specs = [listed] if isinstance(listed, str) else list(listed)
    if "-h" in argv or "--help" in argv:
        parser.parse_args(["--help"])
    try:
        runs = [parse_run(spec) for spec in specs]
    except (ValueError, KeyError) as err:
        parser.error(f"--loss_type: {str(err).strip(chr(39))}")
    if len(runs) < 2:
        parser.error("compare needs two or more --loss_type values, e.g. --loss_type sigmoid ipo:beta=0.5 simpo "
                     "(name or name:key=value,...)")
    paired = next((run.loss for run in runs if get_loss(run.loss).data == "paired"), "sigmoid")
    given = explicit_options(argv)
    adapter_flags = [] if {"lora", "qlora", "use_peft"} & given else ["--lora"]  # LoRA unless told otherwise
    rescore = _option_value(argv, "--rescore")
    output = [] if "output_dir" in given else ["--output_dir", rescore or "comparison"]
    *parsed, config_remaining, cli_remaining = _parse(parser, [*argv, *adapter_flags, *output, "--loss_type", paired])
    script_args, training_args, model_args, dataset_args, compare_args = parsed
    if config_remaining + cli_remaining:
        _check_launch_args(parser, config_remaining + cli_remaining)
        parser.error("compare runs its runs one after another in one process; drop the launcher arguments "
                     f"{config_remaining + cli_remaining} (train the chosen loss with `trl-dpo-plus train` to launch)")
    if rescore is not None and not os.path.isdir(rescore):
        parser.error(f"--rescore {rescore}: no such folder; name the output_dir of a finished comparison")
    _resolve_model(parser, model_args, training_args)
    reward_fn = None
    if compare_args.reward_fn:
        try:
            reward_fn = load_reward_fn(compare_args.reward_fn)
        except (ValueError, FileNotFoundError) as err:
            parser.error(str(err))
    dataset = load_datasets(parser, script_args, training_args, dataset_args, need_eval=True)
    peft_config, quantization_config = _peft_and_quantization([*argv, *adapter_flags], training_args, model_args)
    try:
        result = compare(
            model_args.model_name_or_path, dataset[script_args.dataset_train_split],
            dataset[script_args.dataset_test_split], runs, training_args, peft_config=peft_config,
            quantization_config=quantization_config, reward_fn=reward_fn,
            generation_prompts=compare_args.generation_prompts, samples_per_prompt=compare_args.samples_per_prompt,
            max_new_tokens=compare_args.max_new_tokens, share_reference=compare_args.share_reference,
            dataset_name=script_args.dataset_name or mixture_names(dataset_args), rescore=rescore is not None)
    except RewardFnError as err:  # the user's scorer, tried before any run trains: no usage dump, it is no typo
        print(f"trl-dpo-plus compare: error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:  # bad run settings, found before any run trains
        parser.error(str(err))
    print(markdown_table(result))
    for note in result.notes:
        print(f"note: {note}")
    print(f"\nWritten to {training_args.output_dir}/: " + ", ".join(result.files.values())
          + ", and per run its adapter, model card and diagnostics")
    return 0 if any(r.status == "ok" for r in result.runs) else 1


@dataclasses.dataclass
class IterateArguments:
    """`trl-dpo-plus iterate`'s own options (every `train` option applies to each round)."""

    reward_fn: str | None = dataclasses.field(default=None, metadata={
        "help": "module:function (or file.py:function) scoring completions, TRL-style: fn(prompts=[...], "
                "completions=[...]) -> list[float]. This or --reward_model."})
    reward_model: str | None = dataclasses.field(default=None, metadata={
        "help": "A local AutoModelForSequenceClassification folder; its first logit is the score."})
    rounds: int = dataclasses.field(default=3, metadata={"help": "Rounds of sample, score, pair, train."})
    samples_per_prompt: int = dataclasses.field(default=4, metadata={"help": "Samples per prompt and round."})
    pairs_per_prompt: int = dataclasses.field(default=1, metadata={
        "help": "Paired losses: best vs worst, then second best vs second worst, ... per prompt."})
    max_new_tokens: int = dataclasses.field(default=64, metadata={"help": "Tokens per sample."})
    temperature: float = dataclasses.field(default=1.0, metadata={"help": "Sampling temperature of the training "
                                                                            "prompts (held-out samples: 1)."})
    top_p: float = dataclasses.field(default=1.0, metadata={"help": "Top-p of the training prompts' samples."})
    reference: str = dataclasses.field(default="base", metadata={
        "choices": ["base", "previous"], "help": "The reference: the round-0 base, or the previous round's policy."})
    label_threshold: float | None = dataclasses.field(default=None, metadata={
        "help": "Unpaired losses (kto): a sample scoring above it is desirable (default: its prompt's mean)."})
    eval_prompts: int = dataclasses.field(default=16, metadata={
        "help": "Held-out prompts (from --dataset_test_split, or held back from the train split's prompts)."})
    full_finetune: bool = dataclasses.field(default=False, metadata={"help": "Train the whole model, not LoRA."})
    resume: bool = dataclasses.field(default=False, metadata={
        "help": "Continue after the last finished round recorded in --output_dir/iterate.json."})


def iterate_command(argv: list[str]) -> int:
    _quiet_console()
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    parser = make_train_parser("trl-dpo-plus iterate", extra=(IterateArguments,))
    given = explicit_options(argv)
    adapter_flags = [] if {"lora", "qlora", "use_peft", "full_finetune"} & given else ["--lora"]
    output = [] if "output_dir" in given else ["--output_dir", "iterate"]
    *parsed, config_remaining, cli_remaining = _parse(parser, [*argv, *adapter_flags, *output])
    script_args, training_args, model_args, _, iterate_args = parsed
    if config_remaining + cli_remaining:
        _check_launch_args(parser, config_remaining + cli_remaining)
        parser.error(f"iterate samples and trains in one process; drop the launcher arguments "
                     f"{config_remaining + cli_remaining}")
    if (iterate_args.reward_fn is None) == (iterate_args.reward_model is None):
        parser.error("iterate needs one scorer: --reward_fn module:function or --reward_model PATH")
    _resolve_model(parser, model_args, training_args)
    from .compare import load_reward_fn
    from .data import load_preference_dataset
    from .iterate import iterate, markdown_table

    if script_args.dataset_name is None:
        parser.error("iterate needs prompts: --dataset_name (a file, folder or Hub id with a 'prompt' column)")
    with _one_line_errors(parser, debug, "reading the prompts and the scorer"):
        reward_fn = load_reward_fn(iterate_args.reward_fn) if iterate_args.reward_fn else None
        dataset = load_preference_dataset(script_args.dataset_name, script_args.dataset_config)
        if script_args.dataset_train_split not in dataset:
            raise ValueError(f"{script_args.dataset_name} has no split {script_args.dataset_train_split!r}; it has "
                             f"{list(dataset)} (--dataset_train_split)")
        train_prompts, eval_prompts = _iterate_prompts(dataset, script_args, iterate_args.eval_prompts)
    peft_config, quantization_config = _peft_and_quantization([*argv, *adapter_flags], training_args, model_args)
    with _one_line_errors(parser, debug, "iterate"):
        report = iterate(
            model_args.model_name_or_path, train_prompts, eval_prompts, training_args, reward_fn=reward_fn,
            reward_model=iterate_args.reward_model, rounds=iterate_args.rounds,
            samples_per_prompt=iterate_args.samples_per_prompt, pairs_per_prompt=iterate_args.pairs_per_prompt,
            max_new_tokens=iterate_args.max_new_tokens, temperature=iterate_args.temperature,
            top_p=iterate_args.top_p, reference=iterate_args.reference, label_threshold=iterate_args.label_threshold,
            full_finetune=iterate_args.full_finetune, resume=iterate_args.resume, peft_config=peft_config,
            quantization_config=quantization_config)
    print(markdown_table(report))
    print(f"\nWritten to {training_args.output_dir}/: " + ", ".join(report.files.values())
          + ", and per round (round-<r>/) its adapter, model card, diagnostics and training rows")
    failed = [row for row in report.rounds if row["status"] != "ok"]
    if failed:
        print(f"round {failed[0]['round']} failed: {failed[0]['error']} (error.txt in its folder); fix it and run "
              "again with --resume", file=sys.stderr)
    return 1 if failed else 0


def _iterate_prompts(dataset, script_args, n_eval: int) -> tuple[list, list]:
    """Distinct training prompts, and held-out ones: the test split's first `n_eval`, or the train split's last
    `n_eval` (then not trained on)."""
    from .iterate import distinct_prompts

    train = distinct_prompts(dataset[script_args.dataset_train_split], script_args.dataset_name)
    if script_args.dataset_test_split in dataset:
        return train, distinct_prompts(dataset[script_args.dataset_test_split], script_args.dataset_name)[:n_eval]
    if len(train) <= n_eval:
        raise ValueError(f"{len(train)} distinct prompts leave none to train on after holding out --eval_prompts "
                         f"{n_eval}; lower it or give a --dataset_test_split")
    return train[:-n_eval], train[-n_eval:]


def losses(argv: list[str]) -> int:
    from .losses import get_loss, list_losses

    argparse.ArgumentParser(prog="trl-dpo-plus losses", description="List the registered losses.").parse_args(argv)
    header = ("loss", "data", "reference-free", "defaults", "paper")
    rows = [(n, get_loss(n).data, "no" if get_loss(n).requires_reference else "yes",
             ", ".join(f"{k}={v}" for k, v in get_loss(n).defaults.items()), get_loss(n).paper or "") for n in list_losses()]
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    for row in [header] + rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


def after_training(command: str, argv: list[str]) -> int:
    """`report RUN_DIR`, `sample RUN_DIR --prompt ...`, `merge RUN_DIR OUT`: errors in one line, exit 2."""
    from . import tools

    parser = argparse.ArgumentParser(prog=f"trl-dpo-plus {command}", description=getattr(tools, command).__doc__)
    parser.add_argument("run_dir", help="a folder trl-dpo-plus train (or save_model) wrote, or a checkpoint-N in it")
    if command == "sample":
        parser.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
        parser.add_argument("--max_new_tokens", type=int, default=48)
    if command == "merge":
        parser.add_argument("output_dir", help="where to write the merged model")
        parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: the base's own")
    if command in ("sample", "merge"):
        parser.add_argument("--base", help="the base model (default: the one adapter_config.json names)")
    parser.error = functools.partial(short_error, parser.prog)
    args = parser.parse_args(argv)
    try:
        if command == "report":
            print(tools.report(args.run_dir))
        elif command == "sample":
            for row in tools.sample(args.run_dir, args.prompt, max_new_tokens=args.max_new_tokens, base=args.base):
                print(f"prompt:  {row['prompt']}\nadapter: {row['adapter']}\nbase:    {row['base']}\n")
        else:
            out = tools.merge(args.run_dir, args.output_dir, dtype=args.dtype, base=args.base)
            print(f"Merged model written to {out} (weights, tokenizer, README.md)")
    except (FileNotFoundError, OSError, ValueError) as err:
        short_error(parser.prog, str(err))
    return 0


def version_line() -> str:
    """`trl-dpo-plus X (trl Y, transformers Z, ...)` from the installed metadata, without importing torch or TRL."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(dist: str) -> str:
        try:
            return version(dist)
        except PackageNotFoundError:
            return "not installed"

    from . import __version__

    others = ", ".join(f"{dist} {installed(dist)}" for dist in ("trl", "transformers", "peft", "torch"))
    return f"trl-dpo-plus {__version__} ({others})"


def main(argv: list[str] | None = None) -> int:
    """The `trl-dpo-plus` command; output piped into `head` ends quietly."""
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    except BrokenPipeError:  # the reader closed the pipe: no traceback, and none when Python flushes stdout at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _main(argv: list[str]) -> int:
    top = argparse.ArgumentParser(prog="trl-dpo-plus", description=__doc__.split("\n\n")[0],
                                  formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    top.add_argument("command", choices=COMMANDS)
    top.add_argument("--version", action="store_true", help="print the versions of trl-dpo-plus, TRL, Transformers, "
                     "PEFT and torch, and exit")
    if argv[:1] == ["--version"]:
        print(version_line())
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return 0 if argv else 2
    command = top.parse_args(argv[:1]).command
    rest = argv[1:]
    if command == "train":
        return train(rest)
    if command == "losses":
        return losses(rest)
    if command == "compare":
        return compare_command(rest)
    if command == "iterate":
        return iterate_command(rest)
    if command in ("report", "sample", "merge"):
        return after_training(command, rest)
    if command == "demo":
        from .demo import main as demo_main

        demo_main(rest)
        return 0
    if not rest:
        top.error("run needs a script: trl-dpo-plus run my_dpo.py [its arguments]")
    from .runner import run_script

    return run_script(rest[0], rest[1:])


if __name__ == "__main__":
    sys.exit(main())
