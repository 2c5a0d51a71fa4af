"""Symptom analysis throughput: notes/s end to end vs the bare encoder forward on the same notes.

    .venv/bin/python bench/symptoms.py [--model-dir DIR] [--repeat 8] [--rounds 5] [--device cpu]

End to end is ``SymptomAnalyzer.analyze_many``: sentence splitting, knowledge-base matching,
ConText, encoding of the asserted text, the head and the ranked, coded result. The bare encoder
forward is what any MiniLM user runs on the same raw notes: tokenize (truncating at 256 tokens),
the transformer, mean pooling. Both use the same loaded encoder, batch size and threads; they run
alternately for several rounds in one process and the medians are compared. The target is an
end-to-end time of at most 1.5x the bare forward. Without --model-dir a small demo model is
trained first (its accuracy is not the demo model's; see the model card for that).
Nothing here is a pass/fail test.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.symptoms.analyzer import SymptomAnalyzer
from models.symptoms.train import evaluate_notes, load_eval_notes, train_demo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--repeat", type=int, default=8, help="copies of the evaluation notes")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="carebridge-bench-") as tmp:
        model_dir = args.model_dir
        if model_dir is None:
            print("training a small demo model ...", flush=True)
            model_dir = train_demo(
                Path(tmp) / "symptoms",
                notes_per_condition=4,
                calibration_per_condition=1,
                evaluate=False,
            )
        analyzer = SymptomAnalyzer.load(model_dir, device=args.device)
        eval_notes = load_eval_notes()
        notes = [n.text for n in eval_notes] * args.repeat
        encoder = analyzer.encoder
        sync = torch.cuda.synchronize if analyzer.encoder.device.type == "cuda" else lambda: None

        def timed(run: object) -> float:
            sync()
            start = time.perf_counter()
            run()  # type: ignore[operator]
            sync()
            return time.perf_counter() - start

        def end_to_end() -> None:
            analyzer.analyze_many(notes)

        def bare() -> None:
            encoder.embed_truncated(notes)

        timed(end_to_end)  # warm-up: first batches allocate
        timed(bare)
        e2e, raw = [], []
        for _ in range(args.rounds):
            e2e.append(timed(end_to_end))
            raw.append(timed(bare))
        e2e_s, raw_s = statistics.median(e2e), statistics.median(raw)
        start = time.perf_counter()
        evidence = [analyzer.featurizer.read(n) for n in notes]
        read_ms = (time.perf_counter() - start) * 1000 / len(notes)
        asserted = sum(len(e.asserted_text) for e in evidence) / len(evidence)
        chars = sum(len(n) for n in notes) / len(notes)
        print(
            f"{len(notes)} notes ({len(eval_notes)} distinct, mean {chars:.0f} characters), "
            f"device {encoder.device}, torch threads {torch.get_num_threads()}, "
            f"batch {encoder.batch_size}, median of {args.rounds} rounds"
        )
        print(f"bare encoder forward : {len(notes) / raw_s:8.1f} notes/s")
        print(f"end to end           : {len(notes) / e2e_s:8.1f} notes/s")
        print(f"ratio end-to-end/bare: {e2e_s / raw_s:8.2f}x (target <= 1.5x)")
        print(
            f"sentences + KB matching + ConText: {read_ms:.2f} ms/note; the encoder reads the "
            f"asserted text, mean {asserted:.0f} of {chars:.0f} characters"
        )
        metrics = evaluate_notes(analyzer, eval_notes)
        print(
            f"accuracy of this model on {metrics['n']} evaluation notes: "
            f"top-1 {metrics['top1']:.3f}, top-3 {metrics['top3']:.3f}"
        )


if __name__ == "__main__":
    main()
