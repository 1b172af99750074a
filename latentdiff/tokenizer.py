"""Stable Diffusion's CLIP tokenizer, built offline from the BPE vocabulary inside ``open-clip-torch``.

SD-1.x uses OpenAI's CLIP BPE: 256 byte symbols, the same 256 with an end-of-word marker ``</w>``, 48,894 merges
and two special tokens, 49,408 ids in all. ``open-clip-torch`` ships exactly that merge list as
``open_clip/bpe_simple_vocab_16e6.txt.gz``; from it we write the ``vocab.json`` + ``merges.txt`` that
``transformers.CLIPTokenizer`` reads. We only locate the file: importing ``open_clip`` would pull torchvision.
"""

import gzip
import importlib.util
import json
import tempfile
from pathlib import Path

from transformers import CLIPTokenizer

from .atomic import atomic_entries

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # the merges OpenAI's CLIP keeps: vocab 49,408 = 2·256 bytes + merges + 2 specials
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from each byte to a printable character, so BPE never sees whitespace or controls.

    Its order matters: CLIP numbers the printable bytes first (ids 0-187), then the others (188-255).
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {byte: chr(byte) for byte in printable}
    others = [byte for byte in range(256) if byte not in mapping]
    mapping.update({byte: chr(256 + i) for i, byte in enumerate(others)})  # moved to code points 256, 257, ...
    return mapping


def clip_bpe_path() -> Path:
    """Path of the CLIP BPE merge list shipped inside the ``open-clip-torch`` package (found, not imported)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The CLIP BPE vocabulary comes from the package open-clip-torch, which is not installed. "
            "Install it without its dependencies: pip install --no-deps open-clip-torch"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / BPE_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing from the installed open-clip-torch; reinstall it: "
            "pip install --no-deps --force-reinstall open-clip-torch"
        )
    return path


def _openai_vocab(bpe_path: Path) -> tuple[dict[str, int], list[str]]:
    """The vocabulary and merges in the order OpenAI's CLIP assigns ids."""
    with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = lines[1 : NUM_MERGES + 1]  # line 0 is a version header
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    return {token: i for i, token in enumerate(tokens)}, merges


def _write_vocab_files(vocab: dict[str, int], merges: list[str], folder: Path) -> None:
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def save_vocab_files(tokenizer: CLIPTokenizer, folder: str | Path) -> None:
    """Add ``vocab.json`` + ``merges.txt`` beside a saved ``tokenizer.json``.

    transformers 5 saves only ``tokenizer.json``, but transformers 4's (slow) ``CLIPTokenizer``, which
    diffusers' pipelines ask for, reads only these two files: with both, the folder loads in either version.
    """
    if not hasattr(tokenizer, "backend_tokenizer"):
        return  # a slow (transformers 4) tokenizer writes them itself
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    _write_vocab_files(model["vocab"], merges, Path(folder))


def build_clip_tokenizer(out_dir: str | Path | None = None, model_max_length: int = 77) -> CLIPTokenizer:
    r"""Build the tokenizer of Stable Diffusion 1.x (``openai/clip-vit-large-patch14``) without a download.

    Args:
        out_dir (`str` or `Path`, *optional*):
            When given, the tokenizer is also written there with `save_pretrained`, as a pipeline's `tokenizer/`.
            Its files replace those of an earlier tokenizer there only once all are written; other files stay.
        model_max_length (`int`, *optional*, defaults to 77):
            Length prompts are padded and truncated to (CLIP's text encoder has 77 positions).

    Returns:
        `transformers.CLIPTokenizer`: 49,408 tokens; it pads with `<|endoftext|>` like SD-1.5's tokenizer, so
        `"a photo of a cat"` gives `[49406, 320, 1125, 539, 320, 2368, 49407, 49407, ...]`.
    """
    bpe_path = clip_bpe_path()
    with tempfile.TemporaryDirectory() as tmp:
        _write_vocab_files(*_openai_vocab(bpe_path), Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(
            tmp,
            model_max_length=model_max_length,
            bos_token=BOS_TOKEN,
            eos_token=EOS_TOKEN,
            unk_token=EOS_TOKEN,
            pad_token=EOS_TOKEN,
        )
    if len(tokenizer) != NUM_MERGES + 2 * 256 + 2:
        raise ValueError(f"{bpe_path} gave {len(tokenizer)} tokens instead of 49408: the file is not CLIP's BPE.")
    if out_dir is not None:
        with atomic_entries(out_dir, marker="tokenizer_config.json") as staging:
            tokenizer.save_pretrained(staging)
            save_vocab_files(tokenizer, staging)
    return tokenizer
