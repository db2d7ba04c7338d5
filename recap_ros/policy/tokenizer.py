"""Tokenizers and prompt assembly.

Prompt layout (token order in the backbone)::

    [image tokens per view] [BOS "Task: <task>\\n" + padding] [state token]* [ "Advantage: positive\\n" + padding]
    `---------------------------- shared prefix ----------------------------'  `------ advantage segment ------'

(* only when ``state_input == "prefix"``). With ``state_input == "tokens"`` (π0.5) the normalised state is text in
the prompt instead: ``"Task: <task>, State: 12 255 0 ...;\nAction: "``, one number per dimension
(:func:`discretize_state`, LeRobot's / openpi's pi05 format). The advantage segment comes AFTER the shared prefix and the prefix never
attends to it, so the conditional ("Advantage: positive") and unconditional (no indicator) CFG branches share one
prefix KV cache; the unconditional branch simply masks the segment out. Training also uses
"Advantage: negative" (indicator False) and no segment (indicator None, the 30 % dropout).

Tokenizers: ``byte`` (UTF-8 bytes + 3; ids 0 pad, 1 BOS, 2 EOS) for random-weight / small bundles, and
``sentencepiece`` (a ``tokenizer.model`` file in the bundle, e.g. Gemma's) for real checkpoints.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from recap_ros.policy.errors import PolicyError

POSITIVE, NEGATIVE = "Advantage: positive\n", "Advantage: negative\n"
STATE_BINS = 256


def discretize_state(state) -> np.ndarray:
    """π0.5's state tokens: each normalised dimension (−1 .. 1) -> a bin 0 .. 255,
    ``digitize(x, linspace(−1, 1, 257)[:−1]) − 1`` (values below −1 give −1, as in openpi / LeRobot)."""
    return np.digitize(np.asarray(state, np.float64), np.linspace(-1.0, 1.0, STATE_BINS + 1)[:-1]) - 1


def prompt_text(prompt: str, state=None) -> str:
    """The prompt as the model reads it: ``"Task: <prompt>\n"``, or with a normalised ``state`` π0.5's
    ``"Task: <prompt>, State: <bins>;\nAction: "`` (underscores and newlines of the task become spaces)."""
    if state is None:
        return f"Task: {prompt.strip()}\n"
    task = prompt.strip().replace("_", " ").replace("\n", " ")
    return f"Task: {task}, State: {' '.join(map(str, discretize_state(state)))};\nAction: "


class ByteTokenizer:
    kind = "byte"
    pad_id, bos_id, eos_id = 0, 1, 2
    vocab_size = 256 + 3

    def encode(self, text: str) -> list[int]:
        return [b + 3 for b in text.encode("utf-8")]

    def spec(self) -> dict:
        return {"type": "byte"}


class SentencePieceTokenizer:
    kind = "sentencepiece"

    def __init__(self, path: str | Path):
        import sentencepiece

        self.path = Path(path)
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(self.path))
        except (OSError, RuntimeError) as e:
            raise PolicyError(f"{self.path}: not a readable SentencePiece model ({e})") from None
        self.pad_id = max(self.sp.pad_id(), 0)
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else self.pad_id
        self.vocab_size = self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return list(self.sp.encode(text))

    def spec(self) -> dict:
        return {"type": "sentencepiece", "file": self.path.name}


def train_bpe(prompts: Sequence[str], path: str | Path, max_vocab: int = 1024) -> SentencePieceTokenizer:
    """A SentencePiece BPE tokenizer (byte fallback: any text still encodes) trained on a dataset's prompts as the
    model sees them ("Task: <prompt>" and both advantage texts), written to ``path`` (a ``tokenizer.model``).

    For small models trained from scratch: each word of the dataset's prompts becomes one token (a colour, an arm),
    which the backbone binds to what it sees far more easily than a word spelt in bytes. Real checkpoints keep
    their own tokenizer (Gemma's). Up to ``max_vocab`` pieces: fewer when the prompts have fewer distinct merges."""
    import sentencepiece

    texts = sorted({f"Task: {p.strip()}" for p in prompts if isinstance(p, str) and p.strip()})
    if not texts:
        raise PolicyError("a BPE tokenizer needs at least one non-empty prompt")
    texts += [POSITIVE.strip(), NEGATIVE.strip()]
    path = Path(path)
    with open(path, "wb") as out:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=out, model_type="bpe", vocab_size=int(max_vocab),
            hard_vocab_limit=False, byte_fallback=True, character_coverage=1.0, pad_id=0, unk_id=1, bos_id=2,
            eos_id=3, minloglevel=2)
    return SentencePieceTokenizer(path)


def load_tokenizer(spec: dict, bundle_dir: Path):
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind == "byte":
        return ByteTokenizer()
    if kind == "sentencepiece":
        path = bundle_dir / str(spec.get("file", "tokenizer.model"))
        if not path.is_file():
            raise PolicyError(f"{bundle_dir}: tokenizer file {path.name} is missing")
        return SentencePieceTokenizer(path)
    raise PolicyError(f"{bundle_dir}: config.json tokenizer {spec!r}: type must be 'byte' or 'sentencepiece'")


class PromptEncoder:
    """Prompts + advantage indicators -> fixed-length token arrays for the model (numpy, int64 / bool)."""

    def __init__(self, tokenizer, max_text_tokens: int, max_advantage_tokens: int):
        self.tok, self.max_text, self.max_adv = tokenizer, max_text_tokens, max_advantage_tokens
        self._adv = {True: tokenizer.encode(POSITIVE), False: tokenizer.encode(NEGATIVE)}
        longest = max(len(t) for t in self._adv.values())
        if longest > max_advantage_tokens:
            raise PolicyError(f"advantage segment needs {longest} tokens but max_advantage_tokens is "
                              f"{max_advantage_tokens}")

    def text_tokens(self, prompt: str, state=None) -> list[int]:
        if not isinstance(prompt, str) or not prompt.strip():
            raise PolicyError(f"prompt {prompt!r}: must be a non-empty string")
        ids = [self.tok.bos_id] + self.tok.encode(prompt_text(prompt, state))
        if len(ids) > self.max_text:
            raise PolicyError(f"prompt {prompt!r} is {len(ids)} tokens; the model takes at most {self.max_text}")
        return ids

    def encode(self, prompts: Sequence[str], indicators: Sequence[bool | None], states=None) -> dict[str, np.ndarray]:
        """``states`` (B, state_dim) normalised, for π0.5's state-in-the-prompt models (``state_input`` tokens)."""
        if len(prompts) != len(indicators) or (states is not None and len(states) != len(prompts)):
            raise PolicyError(f"{len(prompts)} prompts but {len(indicators)} indicators"
                              + ("" if states is None else f" and {len(states)} states"))
        b = len(prompts)
        out = {"tokens": np.full((b, self.max_text), self.tok.pad_id, np.int64),
               "token_mask": np.zeros((b, self.max_text), bool),
               "adv_tokens": np.full((b, self.max_adv), self.tok.pad_id, np.int64),
               "adv_mask": np.zeros((b, self.max_adv), bool)}
        for i, (p, ind) in enumerate(zip(prompts, indicators)):
            ids = self.text_tokens(p, None if states is None else states[i])
            out["tokens"][i, :len(ids)], out["token_mask"][i, :len(ids)] = ids, True
            if ind is not None:
                adv = self._adv[bool(ind)]
                out["adv_tokens"][i, :len(adv)], out["adv_mask"][i, :len(adv)] = adv, True
        return out
