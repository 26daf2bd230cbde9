"""Offline HF tokenizer folders built from `mistral-common`'s `tokenizer.model.v1`.

`mistral-common` ships the 32,000-token Mistral-7B-v0.1 SentencePiece model. `build_tokenizer` copies it into a
folder with a `tokenizer_config.json` naming `LlamaTokenizer` (BOS `<s>`, EOS `</s>`, UNK `<unk>`), lets
transformers convert it once (needs `sentencepiece`), checks that the vocabulary really has 32,000 tokens
(transformers 5 silently builds an empty 3-token tokenizer from `LlamaTokenizer(vocab_file=...)`), and saves the
fast tokenizer (`tokenizer.json`), so later loads are fast and need no `sentencepiece`.

Pad token: `<unk>` (id 0), as Starling-RM-7B-alpha used, or `<|pad_0|>` (id 32001) with the OpenChat special
tokens (`<|end_of_turn|>` id 32000 becomes the EOS). The named chat template is stored as the tokenizer's
`chat_template`; the templates live in `starling_jax.data.chat`.

Also here: which tokenizer a template uses by default (`default_tokenizer_for`, the same in prepare_data,
train_rm and score), a folder or Hub id (`resolve_tokenizer_dir`), the data provenance (`data_provenance`: a
fingerprint of the vocabulary, special tokens and probe ids; the template; max_length) and its check, and the
export tokenizer (`prepare_export_tokenizer`: a chat_template verified to render exactly the training tokens and
a pad id that HF sequence-classification pooling cannot confuse with the reward token).
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import os
import shutil
import tempfile
from pathlib import Path

from starling_jax import hub
from starling_jax.data.chat import get_template
from starling_jax.data.tokenize import tokenize_answers
from starling_jax.errors import CheckpointError, DataError

BASE_VOCAB = 32000
OPENCHAT_TOKENS = ("<|end_of_turn|>", "<|pad_0|>")


def sentencepiece_model_path() -> Path:
    """Path of `mistral_common/data/tokenizer.model.v1`."""
    p = importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1"
    path = Path(str(p))
    if not path.is_file():
        raise CheckpointError(f"{path}: mistral-common's tokenizer.model.v1 not found (pip install mistral-common)")
    return path


def _name(chat_template: str, openchat_special_tokens: bool) -> str:
    return f"mistral_v1-{chat_template}" + ("-openchat" if openchat_special_tokens else "")


def build_tokenizer(output_dir, chat_template: str = "llama2_chat", openchat_special_tokens: bool = False) -> Path:
    """Build an HF tokenizer folder at `output_dir` and return its path."""
    from transformers import AutoTokenizer

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(sentencepiece_model_path(), Path(tmp) / "tokenizer.model")
        cfg = {
            "tokenizer_class": "LlamaTokenizer",
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "add_bos_token": True,
            "add_eos_token": False,
            "model_max_length": 32768,
            "clean_up_tokenization_spaces": False,
        }
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
        tok = AutoTokenizer.from_pretrained(tmp)
        if len(tok) != BASE_VOCAB:
            raise CheckpointError(f"{tmp}: converted tokenizer has {len(tok)} tokens, expected {BASE_VOCAB}")
    if openchat_special_tokens:
        tok.add_special_tokens({"additional_special_tokens": list(OPENCHAT_TOKENS)})
        ids = tok.convert_tokens_to_ids(list(OPENCHAT_TOKENS))
        if ids != [BASE_VOCAB, BASE_VOCAB + 1]:
            raise CheckpointError(f"OpenChat tokens got ids {ids}, expected [32000, 32001]")
        tok.eos_token = OPENCHAT_TOKENS[0]
        tok.pad_token = OPENCHAT_TOKENS[1]
    else:
        tok.pad_token = "<unk>"
    template = get_template(chat_template) if chat_template != "tokenizer" else None
    if template is not None:
        tok.chat_template = template
    tok.save_pretrained(str(out))
    # the sentencepiece model is kept for tools that want the slow tokenizer
    shutil.copy(sentencepiece_model_path(), out / "tokenizer.model")
    check = load_tokenizer(out)
    expected = BASE_VOCAB + (2 if openchat_special_tokens else 0)
    if len(check) != expected:
        raise CheckpointError(f"{out}: saved tokenizer has {len(check)} tokens, expected {expected}")
    return out


def cache_root() -> Path:
    env = os.environ.get("STARLING_JAX_CACHE")
    base = Path(env) if env else Path.home() / ".cache" / "starling_jax"
    return base / "tokenizers"


def default_tokenizer_dir(chat_template: str = "llama2_chat", openchat_special_tokens: bool = False) -> Path:
    """Build the tokenizer once into the cache folder and reuse it afterwards."""
    d = cache_root() / _name(chat_template, openchat_special_tokens)
    if (d / "tokenizer.json").is_file() and (d / "tokenizer_config.json").is_file():
        return d
    d.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=d.name + ".", dir=d.parent))
    try:
        build_tokenizer(tmp, chat_template, openchat_special_tokens)
        try:
            os.replace(tmp, d)  # atomic when several processes build at once
        except OSError:
            if not (d / "tokenizer.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return d


def load_tokenizer(path):
    """Load an HF tokenizer folder (CheckpointError if missing or without a tokenizer)."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{p}: tokenizer folder not found")
    if not any((p / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        raise CheckpointError(f"{p}: no tokenizer.json / tokenizer.model / tokenizer_config.json in folder")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(p))
    except Exception as e:  # noqa: BLE001 - any load failure is a bad folder
        raise CheckpointError(f"{p}: cannot load tokenizer: {type(e).__name__}: {e}") from e
    if len(tok) < BASE_VOCAB // 2:
        raise CheckpointError(f"{p}: tokenizer has only {len(tok)} tokens (broken conversion?)")
    if tok.pad_token_id is None:
        tok.pad_token = tok.unk_token or tok.eos_token
    return tok


# ---------------------------------------------------------------------------------------------- which tokenizer
def default_tokenizer_for(template: str) -> Path:
    """The offline default tokenizer of a template, the same one in prepare_data, train_rm and score:
    `openchat_3.5` gets the OpenChat special tokens (`<|end_of_turn|>` is ONE token, the EOS), the others the
    plain Mistral vocabulary with that template as its `chat_template`."""
    named = "llama2_chat" if template == "tokenizer" else template
    return default_tokenizer_dir(named, openchat_special_tokens=template == "openchat_3.5")


def resolve_tokenizer_dir(name: str | Path, key: str | None = None) -> Path:
    """A tokenizer folder, a `gs://` URL or a HuggingFace Hub id (e.g. `meta-llama/Llama-2-7b-chat-hf`, only its
    tokenizer files fetched): `hub.py::resolve`. Missing, offline and not cached, or unknown → one-line
    CheckpointError naming `key=name` (or the name)."""
    return hub.resolve(name, key=key, files="tokenizer")


# ---------------------------------------------------------------------------------------------- provenance
# Text whose ids depend on the vocabulary, the normalizer/pre-tokenizer and whether a BOS is added.
_PROBE = "Hello world! [INST] 1234 naïve 你好 🙂\n\n  tabs\tand <s></s> <unk> <|end_of_turn|> <|im_start|>x"


def tokenizer_fingerprint(tok) -> str:
    """16 hex digits of sha256 over the vocabulary (token ↔ id, added tokens included), the BOS/EOS/UNK and
    special tokens with their ids, and the ids of a probe text with and without special tokens.

    Mistral-7B and Llama-2 both have 32,000 tokens and ids 0/1/2 for `<unk>`/`<s>`/`</s>`; their vocabularies
    differ, so their fingerprints do. The pad token is left out: it changes no rendering's ids (export may
    replace an unsafe one)."""
    h = hashlib.sha256()
    for token, idx in sorted(tok.get_vocab().items(), key=lambda kv: (kv[1], kv[0])):
        h.update(f"{idx}\t{token}\n".encode("utf-8", "surrogatepass"))
    specials = {
        k: [getattr(tok, k, None), getattr(tok, k + "_id", None)] for k in ("bos_token", "eos_token", "unk_token")
    }
    named = {getattr(tok, k, None) for k in ("bos_token", "eos_token", "unk_token")} - {None}
    specials["all"] = sorted((set(tok.all_special_tokens) - {tok.pad_token}) | named)
    h.update(json.dumps(specials, sort_keys=True, default=str).encode())
    h.update(
        json.dumps(
            [
                list(tok(_PROBE, add_special_tokens=True)["input_ids"]),
                list(tok(_PROBE, add_special_tokens=False)["input_ids"]),
            ]
        ).encode()
    )
    return h.hexdigest()[:16]


def template_source(tok, template: str) -> str:
    """The Jinja source a template name stands for (`tokenizer`: the tokenizer's own chat_template)."""
    source = get_template(template)
    return source if source is not None else (getattr(tok, "chat_template", None) or "")


def data_provenance(tok, tokenizer_name, template: str, max_length: int) -> dict:
    """What tokenized data depends on: recorded by prepare_data, in checkpoints and in HF exports."""
    return {
        "tokenizer": str(tokenizer_name),
        "tokenizer_fingerprint": tokenizer_fingerprint(tok),
        "template": template,
        "template_sha256": hashlib.sha256(template_source(tok, template).encode()).hexdigest()[:16],
        "max_length": int(max_length),
    }


def _describe(p: dict) -> str:
    return (
        f"tokenizer {p.get('tokenizer')} (fingerprint {p.get('tokenizer_fingerprint')}), "
        f"template {p.get('template')} (sha {p.get('template_sha256')}), max_length {p.get('max_length')}"
    )


# provenance key → (what an error calls it, the setting that chooses it, the prepare_data flag that does)
_PROVENANCE_FIELDS = {
    "max_length": ("max_length", "max_length", "--max-length"),
    "template": ("template", "template", "--template"),
    "template_sha256": ("template text", "template", "--template"),
    "tokenizer_fingerprint": ("tokenizer", "tokenizer", "--tokenizer"),
}


def check_provenance(
    recorded: dict,
    current: dict,
    recorded_what: str,
    current_what: str,
    keys=("tokenizer_fingerprint", "template", "template_sha256", "max_length"),
    settings: dict[str, str] | None = None,
    remake: str | None = "prepare the data again",
) -> None:
    """DataError (one line) when `recorded` and `current` differ on any of `keys` that both hold. The tokenizer's
    name may differ (another path to the same files); its fingerprint may not.

    The message starts with what differs and the fix: `settings` maps `max_length`, `template` and `tokenizer` to
    the setting that chooses them on the current side (e.g. `data.max_length`, `--template`), which the fix says
    to set to the recorded value; `remake` (None: no such option) is the other way, redoing the recorded side with
    the current values (prepare_data's flags named). Both sides in full follow."""
    bad = [
        k
        for k in keys
        if recorded.get(k) is not None and current.get(k) is not None and str(recorded[k]) != str(current[k])
    ]
    if not bad:
        return
    if "template" in bad and "template_sha256" in bad:
        bad.remove("template_sha256")  # one template change: named once
    settings = settings or {}
    diffs, sets, remakes = [], [], []
    for k in bad:
        what, setting, flag = _PROVENANCE_FIELDS.get(k, (k, k, None))
        # the value a user types: the tokenizer's and the template's name, not their hashes
        typed = {"tokenizer_fingerprint": "tokenizer", "template_sha256": "template"}.get(k, k)
        rec, cur = recorded.get(typed), current.get(typed)
        if k == "tokenizer_fingerprint":
            diffs.append(f"tokenizer ({rec}, fingerprint {recorded[k]}, vs {cur}, fingerprint {current[k]})")
        else:
            diffs.append(f"{what} ({recorded[k]} vs {current[k]})")
        name = settings.get(setting, setting)
        sets.append(f"{name} {rec}" if name.startswith("-") or " " in name else f"{name}={rec}")
        if flag:
            remakes.append(f"{flag} {cur}")
    fix = f"set {', '.join(dict.fromkeys(sets))}"
    if remake:
        fix += f", or {remake}" + (f" with {' '.join(dict.fromkeys(remakes))}" if remakes else "")
    raise DataError(
        f"{recorded_what} and {current_what} differ in {'; '.join(diffs)}: {fix}. {recorded_what} was "
        f"made with {_describe(recorded)}; {current_what} uses {_describe(current)}"
    )


# ---------------------------------------------------------------------------------------------- export
_PROBE_MESSAGES = [
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "How are you? Tell me more."},
]
_PROBE_ANSWERS = ["Fine, thanks for asking!", "", "Ünïcödé 🙂\nline two  with  spaces"]


def _ids(x) -> list[int]:
    if hasattr(x, "keys") and "input_ids" in x:
        x = x["input_ids"]
    return [int(i) for i in x]


def training_ids(tok, template: str, messages, answer: str) -> list[int]:
    """The tokens training uses for one conversation (untruncated)."""
    return tokenize_answers(tok, messages, [answer], template, max_length=1 << 30)[0].tokens.tolist()


def export_chat_template(tok, template: str) -> str:
    """A Jinja chat template whose `apply_chat_template(conversation, tokenize=True)` gives exactly the tokens
    training used for `template`, reward token included.

    The named templates hold no BOS (training lets the tokenizer add it); HF tokenizes a chat rendering with
    `add_special_tokens=False`, so the exported template writes `{{ bos_token }}` itself. Whether the text after
    it needs a leading space depends on the tokenizer's pre-tokenizer (a SentencePiece prefix space is not added
    after a special token by `prepend_scheme=first`), so the candidates are checked on probe conversations and
    the first that reproduces the training tokens exactly is used; none → CheckpointError."""
    source = template_source(tok, template)
    if template == "tokenizer":
        candidates = [source]
    else:
        candidates = [source, "{{ bos_token }}" + source, "{{ bos_token }} " + source]
    for cand in candidates:
        ok = True
        for answer in _PROBE_ANSWERS:
            conv = [*_PROBE_MESSAGES, {"role": "assistant", "content": answer}]
            got = _ids(tok.apply_chat_template(conv, chat_template=cand, tokenize=True))
            if got != training_ids(tok, template, _PROBE_MESSAGES, answer):
                ok = False
                break
        if ok:
            return cand
    raise CheckpointError(
        f"template {template}: no chat_template for this tokenizer reproduces the training "
        "tokens through apply_chat_template; export it with --tokenizer of a compatible tokenizer"
    )


def rendering_end_ids(tok, template: str) -> set[int]:
    """Ids of the last token of probe renderings: the token the reward is read at."""
    return {training_ids(tok, template, _PROBE_MESSAGES, a)[-1] for a in _PROBE_ANSWERS}


def safe_pad_id(tok, template: str, where: str) -> int:
    """A pad id that HF `*ForSequenceClassification` pooling (reward at the last token that is not the pad id)
    cannot confuse with the reward token: the tokenizer's pad if it never ends a rendering, else `<unk>` (the
    Starling-RM-7B-alpha rule); otherwise CheckpointError."""
    ends = rendering_end_ids(tok, template)
    for cand in (tok.pad_token_id, tok.unk_token_id):
        if cand is not None and int(cand) not in ends:
            return int(cand)
    names = tok.convert_ids_to_tokens(sorted(ends))
    raise CheckpointError(
        f"{where}: pad token {tok.pad_token!r} (id {tok.pad_token_id}) is the token a rendering ends with "
        f"({', '.join(names)}), where the reward is read, and the tokenizer has no other safe pad (<unk>); "
        "HF sequence classification would read the reward at the wrong token. Add a pad token to the tokenizer"
    )


def prepare_export_tokenizer(src, template: str, where: str, pad_token: str | None = None):
    """The tokenizer of `src` with the training format as `chat_template` and a safe pad token (`safe_pad_id`),
    not yet saved (every host can check it; one writes it with `save_export_tokenizer`). `pad_token="unk"`
    prefers `<unk>` (the Starling-RM rule) to the tokenizer's own pad."""
    tok = load_tokenizer(src)
    if pad_token == "unk" and tok.unk_token is not None:
        tok.pad_token = tok.unk_token
    chat_template = export_chat_template(tok, template)
    tok.pad_token = tok.convert_ids_to_tokens(safe_pad_id(tok, template, where))
    tok.chat_template = chat_template
    return tok


def save_export_tokenizer(tok, src, dst) -> None:
    dst = Path(dst)
    for stale in ("chat_template.json", "chat_template.jinja"):
        (dst / stale).unlink(missing_ok=True)
    tok.save_pretrained(str(dst))
    if (Path(src) / "tokenizer.model").is_file() and not (dst / "tokenizer.model").is_file():
        shutil.copyfile(Path(src) / "tokenizer.model", dst / "tokenizer.model")
