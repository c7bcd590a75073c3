"""`revq-pipe import-reference`: a tokenizer published with the ReVQ reference code -> OUT/tokenizer.

    SRC (a folder with the reference yaml + ckpt.pth [+ preprocessor.pth], or a hub id such as
    AndyRaoTHU/revq-512T) -> OUT/tokenizer/{config.json, model.safetensors}

OUT is laid out like a training run, so `eval`, `tokenize` and `tolerance` take it as `--run OUT` and write
their reports beside the tokenizer, and `RevqTokenizer.from_pretrained("OUT/tokenizer")` loads it. Importing
the same files with the same VAE again is a no-op. Any other non-empty OUT is refused unless --overwrite, and
even then only the tokenizer of an earlier import is replaced, never a training run's.
"""

from __future__ import annotations

import json
from pathlib import Path

from revq_pipe.pipeline.files import file_sha256
from revq_pipe.pipeline.hub import hub_unreachable_reason
from revq_pipe.pipeline.reference_import import (CHECKPOINT_NAME, IMPORT_KIND, PREPROCESSOR_NAME, PREPROCESSOR_URL,
                                                 PUBLISHED, REFERENCE_CODE, ReferenceFiles,
                                                 find_reference_files, import_reference)
from revq_pipe.pipeline.tokenizer import CONFIG_NAME
from revq_pipe.pipeline.vae import FrozenVAE, is_hub_id
from revq_pipe.stages.console import log
from revq_pipe.stages.run_dir import CHECKPOINT_NAME as TRAIN_CHECKPOINT_NAME
from revq_pipe.stages.run_dir import TOKENIZER_DIR

_HUB_FILES = ["*.yaml", "*.yml", CHECKPOINT_NAME, PREPROCESSOR_NAME]


def run_import_reference(src: str, out: str, *, preprocessor: str | None = None, vae: str | None = None,
                         overwrite: bool = False) -> Path:
    """Import the published tokenizer at `src` into `out`/tokenizer and return that folder."""
    # --- setup: the reference files, the VAE, the output folder --------------------------------
    out_dir = Path(out).expanduser().resolve()
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"--out {out_dir} is a file; pass a folder (new or empty)")
    folder, source = _resolve_source(src, preprocessor, out_dir)
    files = find_reference_files(folder, Path(preprocessor).expanduser().resolve() if preprocessor else None)
    frozen = FrozenVAE.load(vae, device="cpu") if vae else None
    target = out_dir / TOKENIZER_DIR
    if out_dir.is_dir() and any(out_dir.iterdir()):
        previous = _previous_import(target)
        if previous is not None and _same_import(previous, files, frozen):
            log(f"{target} already holds this import (same files and VAE); nothing to do")
            return target
        _check_replaceable(out_dir, previous, overwrite)

    # --- import and write ------------------------------------------------------------------------
    tokenizer = import_reference(files, source=source, vae=frozen)
    tokenizer.save_pretrained(target)  # replaces the folder as a whole: config and weights appear together
    log(f"imported {source}: {tokenizer.num_tokens} tokens x {tokenizer.token_dim} values, {tokenizer.codebook_size} "
        f"codes per position, rectifier {tokenizer.rectifier_spec.width} x {tokenizer.rectifier_spec.depth} "
        f"(plain, as the reference), latents {'x'.join(map(str, tokenizer.latent_shape))} of "
        f"{tokenizer.vae_identity['source']}")
    if not tokenizer.vae_identity.get("weights_sha256"):
        log(f"note: {tokenizer.provenance['vae_note']}")
    log(f"tokenizer written to {target}; use it with --run {out_dir} (eval, tokenize, tolerance) or "
        f"RevqTokenizer.from_pretrained('{target}')")
    return target


# --- the source: a local folder or a hub repository ---------------------------------------------


def _resolve_source(src: str, preprocessor: str | None, out: Path) -> tuple[Path, str]:
    """(local folder holding the files, what to record as the source)."""
    path = Path(src).expanduser()
    if path.exists():
        return path.resolve(), str(path.resolve())
    if not is_hub_id(src):
        raise FileNotFoundError(f"{src} is neither a local folder (none at {path.resolve()}) nor a hub id; pass the "
                                f"folder holding a published tokenizer's yaml and {CHECKPOINT_NAME}, or its hub id "
                                f"({', '.join(PUBLISHED)})")
    folder = _download(src, out)
    if preprocessor is None and not (folder / PREPROCESSOR_NAME).is_file():
        raise FileNotFoundError(f"{src} holds no {PREPROCESSOR_NAME}: the latent statistics are in the reference "
                                f"code's repository; download {PREPROCESSOR_URL} and pass --preprocessor FILE")
    return folder, src


def _download(repo_id: str, out: Path) -> Path:
    """The hub repository's reference files, from the local hub cache or downloaded; offline, what to fetch."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(_fetch_instructions(repo_id, "huggingface_hub is not installed", out)) from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES, local_files_only=True))
    except Exception:  # not in the hub cache (huggingface_hub raises several types for that)
        pass
    reason = hub_unreachable_reason()
    if reason:
        raise FileNotFoundError(_fetch_instructions(repo_id, reason, out))
    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES))
    except Exception as error:  # unknown repository, gated, network dropped mid-way
        raise FileNotFoundError(_fetch_instructions(
            repo_id, f"{type(error).__name__}: {str(error).splitlines()[0][:200]}", out)) from None


def _fetch_instructions(repo_id: str, reason: str, out: Path) -> str:
    """Which files to fetch by hand, from where, and where to put them."""
    local = Path("models") / repo_id.split("/")[-1]
    return (f"cannot download {repo_id} ({reason}). Fetch these three files on a machine with network and put them "
            f"in one folder, e.g. {local}/:\n"
            f"  1. the reference yaml (a file such as 512T_NC=16384.yaml) and {CHECKPOINT_NAME} from "
            f"https://huggingface.co/{repo_id}:\n"
            f"     huggingface-cli download {repo_id} --include '*.yaml' {CHECKPOINT_NAME} --local-dir {local}\n"
            f"  2. ckpt/preprocessor.pth from the reference code ({REFERENCE_CODE}), saved as {local}/"
            f"{PREPROCESSOR_NAME}:\n"
            f"     curl -L -o {local}/{PREPROCESSOR_NAME} {PREPROCESSOR_URL}\n"
            f"then run: revq-pipe import-reference {local} --out {out}")


# --- the output folder ----------------------------------------------------------------------------


def _previous_import(target: Path) -> dict | None:
    """The tokenizer config of an earlier import at `target`, or None (absent, or not an import)."""
    try:
        config = json.loads((target / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return None
    return config if config.get("provenance", {}).get("kind") == IMPORT_KIND else None


def _same_import(previous: dict, files: ReferenceFiles, vae: FrozenVAE | None) -> bool:
    """The earlier import read the same three files and recorded the same VAE."""
    recorded = previous["provenance"].get("files", {})
    current = {"config": files.config, "checkpoint": files.checkpoint, "preprocessor": files.preprocessor}
    if any(recorded.get(role, {}).get("sha256") != file_sha256(path) for role, path in current.items()):
        return False
    recorded_vae = previous.get("vae", {})
    if vae is None:
        return recorded_vae.get("weights_sha256") is None
    return recorded_vae.get("weights_sha256") == vae.identity["weights_sha256"]


def _check_replaceable(out: Path, previous: dict | None, overwrite: bool) -> None:
    """Refuse a non-empty folder unless --overwrite; never replace a training run's tokenizer."""
    held = ", ".join(sorted(p.name for p in out.iterdir())[:8])
    if not overwrite:
        raise FileExistsError(f"--out {out} is not empty (it holds {held}); pass --overwrite to replace the tokenizer "
                              "of an earlier import there, or choose a new --out")
    if (out / TRAIN_CHECKPOINT_NAME).exists() or ((out / TOKENIZER_DIR).exists() and previous is None):
        raise FileExistsError(f"--out {out} is a training run or holds a tokenizer that was not imported (it holds "
                              f"{held}); --overwrite only replaces an earlier import; choose a new --out")
    stale = sorted(p.name for p in out.iterdir() if p.name != TOKENIZER_DIR)
    if previous is not None and stale:
        log(f"note: {', '.join(stale)} in {out} were made with the tokenizer being replaced")
