"""A tiny *random-weight* causal LM, built offline, for tests and benchmarks of the LLM engine.

`build_tiny_model` writes a Llama-style model (hidden 256, 4 layers, 4 heads, about 3-4 M
parameters) with randomly initialised weights and a byte-level BPE tokenizer trained locally
(``tokenizers``) on a small English corpus generated from templates in this module. Nothing is
downloaded. The directory loads with ``AutoModelForCausalLM.from_pretrained(dir)`` and
``AutoTokenizer.from_pretrained(dir)`` and carries a ChatML-style chat template.

Its text is meaningless: the weights are random. The model is named ``sage-tiny-random-lm``
(config, README) so nobody mistakes its output for answers. It exists so the engine's batching,
streaming, stop handling and token accounting run on real tensors on any CPU in seconds.

The build is deterministic given ``seed`` and idempotent: a finished directory holds the marker
file `MARKER`, and a second call returns at once.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

MODEL_NAME = "sage-tiny-random-lm"
MARKER = ".sage-tiny-model.json"
KINDS = ("llama", "qwen2")

PAD, BOS, EOS, IM_START, IM_END = "<|pad|>", "<|bos|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, IM_START, IM_END]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

README = f"""# {MODEL_NAME}

A tiny causal language model with **random weights**, built offline by
`sage_prefect.controlplane.engines.tiny_model.build_tiny_model` for tests and benchmarks.

**The text it generates is meaningless.** Nothing was trained except the byte-level BPE
tokenizer (on a small built-in English corpus). Do not use its output as an answer to anything.

Build parameters: see `{MARKER}`.
"""

_SUBJECTS = [
    "the river",
    "a small robot",
    "the old library",
    "our team",
    "the data pipeline",
    "a quiet village",
    "the scheduler",
    "every student",
    "the mountain road",
    "a curious cat",
    "the weather station",
    "the night train",
]
_VERBS = [
    "carries",
    "reads",
    "builds",
    "measures",
    "remembers",
    "follows",
    "explains",
    "collects",
    "watches",
    "repairs",
    "sorts",
    "finds",
]
_OBJECTS = [
    "the morning light",
    "long lists of numbers",
    "a map of the coast",
    "stories about the sea",
    "every request in order",
    "the answer to a question",
    "small pieces of text",
    "the sound of rain",
    "old photographs",
    "a bright red kite",
    "records from the archive",
    "the last message",
]
_ENDINGS = [
    "before the sun goes down.",
    "without a single mistake.",
    "while everyone is asleep.",
    "and then it rests for a while.",
    "because nobody else will.",
    "in a careful and patient way.",
    "as the wind turns cold.",
    "during the long winter.",
]
_QUESTIONS = [
    "What is the capital of France?",
    "How do I sort a list in Python?",
    "Can you summarise this paragraph for me?",
    "Why is the sky blue during the day?",
    "Which data structure should I use for a queue?",
    "Please write a short poem about autumn.",
    "How many tokens does this sentence have?",
    "Explain continuous batching in simple words.",
]
_EXTRA = [
    "Hello! How can I help you today?",
    "Thank you, that was very helpful.",
    "The quick brown fox jumps over the lazy dog.",
    "Numbers like 1, 2, 3, 42 and 2025 appear in text too.",
    "Café, naïve, résumé and jalapeño use accented letters.",
    "def add(a, b):\n    return a + b",
    '{"name": "sage", "items": [1, 2, 3]}',
    "Once upon a time, in a land far away, there lived a wise old owl.",
]


_WORD_TEXT = """
about above across action active actually add address after again against age agree ahead air all allow
almost alone along already also although always among amount animal another answer any anyone anything
appear apple apply area argue arm around arrive art article ask attack attention available avoid away
baby back bad bag ball bank bar base basket beautiful because become bed before begin behavior behind
believe benefit best better between beyond big bill bird bit black blood blue board boat body book born
both box boy break bring brother budget build building business buy call camera campaign cancer
candidate capital car card care career carry case catch cause cell center central century certain chair
challenge chance change character charge check child choice choose church citizen city civil claim class
clear close coach cold collection college color come commercial common community company compare
computer concern condition conference consider consumer contain continue control cost could country
couple course court cover create crime cultural culture cup current customer cut dark data daughter day
dead deal debate decade decide decision deep defense degree describe design despite detail determine
develop difference different difficult dinner direction director discover discuss disease doctor dog
door down draw dream drive drop drug during early east easy eat economic economy edge education effect
effort eight either election else employee energy enjoy enough enter entire environment especially
establish evening event ever every evidence exactly example executive exist expect experience expert
explain eye face fact factor fail fall family far fast father fear federal feel feeling few field fight
figure fill film final finally financial find fine finger finish fire firm first fish five floor fly
focus follow food foot force foreign forget form former forward four free friend front full fund future
game garden gas general generation girl give glass goal good government great green ground group grow
growth guess gun guy hair half hand hang happen happy hard have head health hear heart heat heavy help
herself high himself history hit hold home hope hospital hot hotel hour house however huge human hundred
husband idea identify image imagine impact important improve include including increase indeed indicate
individual industry information inside instead institution interest interesting international interview
investment involve island issue item itself job join just keep kid kill kind kitchen know knowledge land
language large last late later laugh law lawyer lay lead leader learn least leave left leg legal less
letter level lie life light like likely line list listen little live local long look lose loss lot love
low machine magazine main maintain major majority make manage management manager many market marriage
material matter maybe mean measure media medical meet meeting member memory mention message method
middle might military million mind minute miss mission model modern moment money month more morning most
mother mouth move movement movie much music must myself name nation national natural nature near nearly
necessary need network never news newspaper next nice night none north note nothing notice number occur
offer office officer official often oil once only onto open operation opportunity option order
organization other others outside over own owner page pain painting paper parent part participant
particular particularly partner party pass past patient pattern pay peace people perform performance
perhaps period person personal phone physical pick picture piece place plan plant play player point
police policy political popular population position positive possible power practice prepare present
president pressure pretty prevent price private probably problem process produce product production
professional professor program project property protect prove provide public pull purpose push quality
question quickly quite race radio raise range rate rather reach read ready real reality realize really
reason receive recent recently recognize record reduce reflect region relate relationship religious
remain remember remove report represent require research resource respond response rest result return
reveal rich right rise risk road rock role room rule safe same save say scene school science scientist
score season seat second section security seek seem sell send senior sense series serious serve service
seven several shake share shoot short should shoulder show side sign significant similar simple simply
since sing single sister sit site situation size skill skin small smile social society soldier some
somebody someone something sometimes song soon sort sound source south southern space speak special
specific speech spend sport spring staff stage stand standard star start state statement station stay
step still stock stop store story strategy street strong structure student study stuff style subject
success successful such suddenly suffer suggest summer support sure surface system table take talk task
teach teacher team technology television tell ten tend term test thank theory thing think third those
though thought thousand threat three through throughout throw thus today together tonight total tough
toward town trade traditional training travel treat treatment tree trial trip trouble true truth try
turn type under understand unit until upon usually value various very victim view violence visit voice
vote wait walk wall want war watch water weapon wear week weight well west western whatever whether
which while white whole whom whose why wide wife will win wind window wish within without woman wonder
word work worker world worry would write writer wrong yard yeah year yes yet young yourself
"""
_WORDS = _WORD_TEXT.split()


def corpus_lines() -> list[str]:
    """The built-in training corpus for the tokenizer (deterministic, a few hundred lines)."""
    lines: list[str] = []
    for i, subject in enumerate(_SUBJECTS):
        for j, verb in enumerate(_VERBS):
            obj = _OBJECTS[(i * 5 + j) % len(_OBJECTS)]
            ending = _ENDINGS[(i + j * 3) % len(_ENDINGS)]
            lines.append(f"{subject.capitalize()} {verb} {obj} {ending}")
    for q in _QUESTIONS:
        lines.append(f"{IM_START}user\n{q}{IM_END}\n{IM_START}assistant\n")
        lines.append(q)
    lines.extend(_EXTRA * 3)
    rng = random.Random(20250101)  # fixed: the corpus (hence the tokenizer) never changes
    for _ in range(300):
        words = rng.sample(_WORDS, rng.randint(6, 14))
        lines.append(" ".join(words).capitalize() + rng.choice([".", ".", "!", "?", ","]))
    return lines


def default_tiny_model_dir() -> Path:
    """``$SAGE_HOME/models/sage-tiny-random-lm`` (``SAGE_HOME`` defaults to ``~/.sage-prefect``)."""
    home = Path(os.environ.get("SAGE_HOME", "~/.sage-prefect")).expanduser()
    return home / "models" / MODEL_NAME


def is_tiny_model_dir(directory: Path) -> bool:
    return (Path(directory) / MARKER).is_file()


def _train_tokenizer(vocab_size: int) -> object:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_lines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _make_config(kind: str, vocab_size: int, ids: dict[str, int]) -> object:
    common: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        "bos_token_id": ids[BOS],
        "eos_token_id": ids[EOS],
        "pad_token_id": ids[PAD],
        "initializer_range": 0.02,
        "sage_model_name": MODEL_NAME,
        "sage_note": "random weights: the generated text is meaningless",
    }
    if kind == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(**common)
    from transformers import Qwen2Config

    return Qwen2Config(**common)


def _write_model(target: Path, *, vocab_size: int, seed: int, kind: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    tokenizer = _train_tokenizer(vocab_size)
    ids = {t: int(tokenizer.convert_tokens_to_ids(t)) for t in SPECIAL_TOKENS}  # type: ignore[attr-defined]
    n_vocab = len(tokenizer)  # type: ignore[arg-type]
    config = _make_config(kind, n_vocab, ids)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    model.config.name_or_path = MODEL_NAME
    model.generation_config = GenerationConfig(
        bos_token_id=ids[BOS],
        eos_token_id=[ids[EOS], ids[IM_END]],
        pad_token_id=ids[PAD],
        do_sample=False,
    )
    model.save_pretrained(str(target))
    tokenizer.save_pretrained(str(target))  # type: ignore[attr-defined]
    (target / "README.md").write_text(README, encoding="utf-8")
    params = sum(p.numel() for p in model.parameters())
    info = {"name": MODEL_NAME, "kind": kind, "seed": seed, "vocab_size": n_vocab, "parameters": params}
    (target / MARKER).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def build_tiny_model(directory: Path, *, vocab_size: int = 2048, seed: int = 0, kind: str = "llama") -> Path:
    """Write the tiny random-weight model and its tokenizer to ``directory`` (idempotent); returns it.

    If ``directory`` already holds a finished build (its marker file exists) nothing is done. The
    model is built in a temporary sibling directory and moved into place, so a crashed build
    never leaves a directory that looks finished.
    """
    directory = Path(directory).expanduser()
    if is_tiny_model_dir(directory):
        return directory
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if vocab_size < 300:
        raise ValueError(f"vocab_size must be at least 300 (256 byte tokens + merges), got {vocab_size}")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.build-", dir=directory.parent))
    try:
        _write_model(tmp, vocab_size=vocab_size, seed=seed, kind=kind)
        if is_tiny_model_dir(directory):  # another process finished first
            return directory
        if directory.is_dir() and not any(directory.iterdir()):
            directory.rmdir()
        if not directory.exists():
            try:
                os.rename(tmp, directory)
                return directory
            except OSError:
                if is_tiny_model_dir(directory):
                    return directory
                if directory.exists() and any(directory.iterdir()):
                    pass  # fall through: copy into the existing directory
                else:
                    raise
        # The directory exists with other files in it: copy ours in, the marker last.
        directory.mkdir(parents=True, exist_ok=True)
        for item in sorted(tmp.iterdir(), key=lambda p: p.name == MARKER):
            shutil.copy2(item, directory / item.name)
        return directory
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
