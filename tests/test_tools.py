"""The tools around a checkpoint: loading it alone (weights_only), predict, evaluate, ONNX export, alignment plots.

One tiny model is trained per session (a few dozen CPU steps); the scripts' ``main`` functions run in-process.
"""

import json
import shutil
import subprocess
from pathlib import Path

import editdistance
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from crnn.decoding import BeamSearchDecoder, GreedyDecoder
from crnn.inference import load_recognizer, read_image, recognize
from crnn.model import CRNN
from crnn.module import CRNNModule
from crnn.pipeline import train
from data import BadInputError, LineRenderer, collate_lines

from conftest import ROOT, compose_train, load_script


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """``last.ckpt`` of a crnn_small digits model trained for 18 steps."""
    output_dir = tmp_path_factory.mktemp("run")
    train(compose_train("model=crnn_small", "trainer=cpu", "trainer.max_epochs=3", "trainer.max_time=null",
                        "data.train_size=96", "data.val_size=16", "data.test_size=16", "data.batch_size=16",
                        "callbacks.progress_bar.refresh_rate=0", output_dir=output_dir))
    return output_dir / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    """Five rendered digit lines of different widths as 8-bit PNGs."""
    directory = tmp_path_factory.mktemp("images")
    renderer, rng = LineRenderer(max_length=10), np.random.default_rng(3)
    for index in range(5):
        pixels = np.rint(renderer(rng)[0][0].numpy() * 255).astype(np.uint8)
        Image.fromarray(pixels).save(directory / f"line{index}.png")
    return directory


def test_checkpoint_loads_weights_only_and_rebuilds_the_module(checkpoint):
    contents = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert {"charset", "blank", "height", "model"} <= set(contents["hyper_parameters"])
    assert "RNGStateCheckpoint" in contents["callbacks"]
    module = load_recognizer(checkpoint)
    reference = CRNNModule.load_from_checkpoint(checkpoint, map_location="cpu").eval()
    assert not module.training and module.charset.characters == reference.charset.characters == "0123456789"
    images, widths = torch.rand(3, 1, 32, 90), torch.tensor([90, 61, 17])
    with torch.no_grad():
        torch.testing.assert_close(module(images, widths), reference(images, widths), rtol=0, atol=0)
    assert module.input_format == (1, 32)


def test_input_format_follows_the_network_config():
    """(channels, height) that read_image, evaluate and export use: the model's in_channels (grey without one)."""
    rgb = {"_target_": "crnn.model.CRNN", "in_channels": 3, "channels": [4, 4, 4, 4, 4], "rnn_hidden": 8}
    assert CRNNModule(charset="01", model=rgb, height=32).input_format == (3, 32)
    grey = {key: value for key, value in rgb.items() if key != "in_channels"}
    assert CRNNModule(charset="01", model=grey, height=32).input_format == (1, 32)


def test_predict_prints_path_text_confidence_like_the_module(checkpoint, image_dir, capsys):
    results = load_script("predict").main(["--checkpoint", str(checkpoint), str(image_dir), "--batch-size", "2",
                                      "--device", "cpu"])
    lines = capsys.readouterr().out.strip().splitlines()
    paths = sorted(image_dir.glob("*.png"))
    assert [line.split("\t")[0] for line in lines] == [str(p) for p in paths] == [r[0] for r in results]
    module = load_recognizer(checkpoint)
    for line, path in zip(lines, paths):
        _, text, confidence = line.split("\t")
        image = read_image(path, module)
        assert text == module.predict_texts(image[None], torch.tensor([image.shape[-1]]))[0]  # batch of 1
        assert 0.0 <= float(confidence) <= 1.0


def test_predict_json_gives_the_text_with_character_and_word_positions(checkpoint, image_dir, tmp_path, capsys):
    """Same text and confidence as the plain output; one box per character inside the original image, in reading
    order; with --words one word (digits have no spaces) spanning them. Images are upscaled 3x first, so that
    positions must be scaled back to the original pixels."""
    predict = load_script("predict")
    image_dir = Path(shutil.copytree(image_dir, tmp_path / "images"))
    for path in sorted(image_dir.glob("*.png"))[:3]:
        with Image.open(path) as image:
            image.resize((image.width * 3, image.height * 3)).save(path.parent / f"big_{path.name}")
    plain = predict.main(["--checkpoint", str(checkpoint), str(image_dir), "--device", "cpu", "--decoder", "beam"])
    capsys.readouterr()
    results = predict.main(["--checkpoint", str(checkpoint), str(image_dir), "--device", "cpu", "--decoder", "beam",
                            "--json", "--words"])
    printed = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert printed == results and len(results) == len(plain) == 8
    for (path, text, confidence), result in zip(plain, results):
        with Image.open(path) as image:
            assert (result["width"], result["height"]) == image.size
        assert (result["path"], result["text"]) == (path, text)
        assert result["confidence"] == pytest.approx(confidence, rel=1e-3)
        assert result["log_prob"] == pytest.approx(np.log(confidence), abs=1e-3)
        assert "".join(c["char"] for c in result["chars"]) == text
        starts = [c["x0"] for c in result["chars"]]
        assert starts == sorted(starts)
        assert all(0 <= c["x0"] < c["x1"] <= result["width"] and 0 <= c["confidence"] <= 1 for c in result["chars"])
        assert [w["word"] for w in result["words"]] == text.split()
        if text:
            assert (result["words"][0]["x0"], result["words"][0]["x1"]) == (starts[0], result["chars"][-1]["x1"])
    by_name = {Path(r["path"]).name: r for r in results}
    for name in ["line0.png", "line1.png", "line2.png"]:
        small, big = by_name[name], by_name[f"big_{name}"]
        if small["text"] == big["text"] and small["text"]:  # the same reading at 3x: about the same place
            assert big["chars"][0]["x0"] == pytest.approx(3 * small["chars"][0]["x0"], abs=12)
    assert any(r["text"] for r in results)


def test_predict_beam_options_constrain_the_output(checkpoint, image_dir, tmp_path, capsys):
    predict = load_script("predict")
    base = ["--checkpoint", str(checkpoint), str(image_dir), "--device", "cpu", "--decoder", "beam"]
    assert all(set(text) <= set("13") for _, text, _ in predict.main([*base, "--allow", "13"]))
    (tmp_path / "codes.txt").write_text("123\n4567\n", encoding="utf-8")
    constrained = predict.main([*base, "--lexicon", str(tmp_path / "codes.txt"), "--lexicon-mode", "line"])
    assert all(text in ("123", "4567", "") for _, text, _ in constrained)
    lm = tmp_path / "digits.arpa"
    load_script("train_char_lm").main([str(tmp_path / "codes.txt"), "--order", "3", "--output", str(lm)])
    with_lm = predict.main([*base, "--lm", str(lm), "--lm-weight", "0.3", "--insertion-bonus", "0.5"])
    assert len(with_lm) == 5
    with pytest.raises(SystemExit, match="--lm needs --decoder beam"):
        predict.main(["--checkpoint", str(checkpoint), str(image_dir), "--lm", str(lm)])


def test_predict_hotword_options(checkpoint, image_dir, tmp_path):
    """A heavy hotword bonus makes every line the hotword (the digits charset has no space: a line is one word)."""
    predict = load_script("predict")
    base = ["--checkpoint", str(checkpoint), str(image_dir), "--device", "cpu", "--decoder", "beam"]
    boosted = predict.main([*base, "--hotwords", "123", "--hotword-weight", "50"])
    assert [text for _, text, _ in boosted] == ["123"] * len(boosted)
    (tmp_path / "hot.txt").write_text("4567\n", encoding="utf-8")
    assert {text for _, text, _ in predict.main([*base, "--hotwords-file", str(tmp_path / "hot.txt"),
                                                 "--hotword-weight", "50"])} == {"4567"}
    with pytest.raises(SystemExit, match="not both"):
        predict.main([*base, "--hotwords", "1", "--hotwords-file", str(tmp_path / "hot.txt")])
    with pytest.raises(SystemExit, match="--word-lm needs --decoder beam"):
        predict.main(["--checkpoint", str(checkpoint), str(image_dir), "--word-lm", "x.arpa"])


def test_predict_word_lm_option(checkpoint, image_dir, tmp_path):
    """A heavy word LM with a heavy penalty for unknown words keeps the output to its vocabulary (or empty)."""
    pytest.importorskip("kenlm")
    predict = load_script("predict")
    base = ["--checkpoint", str(checkpoint), str(image_dir), "--device", "cpu", "--decoder", "beam"]
    (tmp_path / "codes.txt").write_text("123\n4567\n", encoding="utf-8")
    words = tmp_path / "words.arpa"
    load_script("train_char_lm").main([str(tmp_path / "codes.txt"), "--unit", "word", "--order", "2",
                                       "--output", str(words)])
    with_words = predict.main([*base, "--word-lm", str(words), "--word-lm-weight", "5", "--word-unk-offset", "-50"])
    assert all(text in ("123", "4567", "") for _, text, _ in with_words) and len(with_words) == 5


def test_predict_reads_only_formats_pillow_opens_and_rejects_a_zero_batch(checkpoint, image_dir, tmp_path):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "line.png").write_bytes((image_dir / "line0.png").read_bytes())
    (mixed / "notes.pdf").write_bytes(b"%PDF-1.4 not an image")  # Pillow writes PDF, cannot read it
    predict = load_script("predict")
    assert [Path(r[0]).name for r in predict.main(["--checkpoint", str(checkpoint), str(mixed), "--device", "cpu"])] \
        == ["line.png"]
    with pytest.raises(SystemExit):
        predict.main(["--checkpoint", str(checkpoint), str(mixed), "--batch-size", "0"])


def test_greedy_confidence_is_the_best_path_probability_of_the_line_alone(checkpoint, image_dir):
    module = load_recognizer(checkpoint)
    short, long = (read_image(image_dir / name, module) for name in ("line0.png", "line1.png"))
    if short.shape[-1] > long.shape[-1]:
        short, long = long, short
    with torch.no_grad():
        log_probs, _ = module(short[None], torch.tensor([short.shape[-1]]))
    expected = log_probs[:, 0].amax(-1).sum().exp().item()  # product over the line's own frames
    assert recognize(module, [short, long], GreedyDecoder())[0].confidence == pytest.approx(expected, rel=1e-4)


def test_beam_confidence_sums_the_alignments_greedy_takes_one(checkpoint, image_dir):
    module = load_recognizer(checkpoint)
    images = [read_image(path, module) for path in sorted(image_dir.glob("*.png"))]
    greedy, beam = recognize(module, images, GreedyDecoder()), recognize(module, images, BeamSearchDecoder(32))
    for (greedy_text, greedy_p), (beam_text, beam_p) in zip(greedy, beam):
        assert 0.0 < greedy_p <= 1.0 and 0.0 < beam_p <= 1.0
        if beam_text == greedy_text:  # all the text's alignments vs its best one
            assert beam_p >= greedy_p


@pytest.fixture(scope="module")
def labelled_dir(tmp_path_factory) -> Path:
    """Twelve rendered digit lines as a gt.txt folder, plus a thirteenth line whose label has a letter."""
    directory = tmp_path_factory.mktemp("labelled") / "test"
    load_script("render_dataset").main(["--size", "12", "--seed", "5", "--output", str(directory)])
    with open(directory / "gt.txt", "a", encoding="utf-8") as gt:
        gt.write("images/000000.png\t12a\n")
    return directory


def test_evaluate_matches_predict_and_editdistance_on_folder_and_lmdb(checkpoint, labelled_dir, tmp_path, capsys):
    lmdb_dir = tmp_path / "lmdb"
    load_script("make_lmdb").main([str(labelled_dir), str(lmdb_dir)])
    capsys.readouterr()
    errors, metrics_json = tmp_path / "errors.tsv", tmp_path / "metrics.json"
    results = load_script("evaluate").main(["--checkpoint", str(checkpoint), str(labelled_dir), str(lmdb_dir),
                                       "--batch-size", "5", "--device", "cpu", "--errors", str(errors),
                                       "--json", str(metrics_json)])
    printed = capsys.readouterr().out.splitlines()
    # the reference: predict.py on each image, scored line by line with editdistance
    lines = [line.split("\t") for line in (labelled_dir / "gt.txt").read_text().splitlines()]
    predicted = {path: text for path, text, _ in load_script("predict").main(
        ["--checkpoint", str(checkpoint), str(labelled_dir / "images"), "--device", "cpu"])}
    texts = [predicted[str(labelled_dir / path)] for path, _ in lines]
    edits = sum(editdistance.eval(text, label) for text, (_, label) in zip(texts, lines))
    cer = edits / sum(len(label) for _, label in lines)
    accuracy = sum(text == label for text, (_, label) in zip(texts, lines)) / len(lines)
    for name in (str(labelled_dir), str(lmdb_dir)):
        assert results[name]["lines"] == 13 and results[name]["unknown_char_lines"] == 1
        assert results[name]["cer"] == pytest.approx(cer) and results[name]["acc"] == pytest.approx(accuracy)
    assert results["total"]["lines"] == 26 and results["total"]["cer"] == pytest.approx(cer)
    assert printed[0].startswith(f"{labelled_dir}\tlines=13 cer={cer:.4f}") and "outside the charset" in printed[0]
    assert json.loads(metrics_json.read_text()) == results
    rows = errors.read_text().splitlines()
    assert len(rows) == 1 + 2 * sum(text != label for text, (_, label) in zip(texts, lines))
    assert [texts[-1]] == [row.split("\t")[2] for row in rows if row.split("\t")[1] == "12a"][:1]


def test_evaluate_with_beam_search_scores_the_beam_readings(checkpoint, labelled_dir):
    module = load_recognizer(checkpoint)
    lines = [line.split("\t") for line in (labelled_dir / "gt.txt").read_text().splitlines()]
    readings = recognize(module, [read_image(labelled_dir / path, module) for path, _ in lines], BeamSearchDecoder(3))
    edits = sum(editdistance.eval(text, label) for (text, _), (_, label) in zip(readings, lines))
    results = load_script("evaluate").main(["--checkpoint", str(checkpoint), str(labelled_dir), "--decoder", "beam",
                                       "--beam-width", "3", "--device", "cpu"])
    assert results[str(labelled_dir)]["cer"] == pytest.approx(edits / sum(len(label) for _, label in lines))


def test_evaluate_names_a_path_that_is_no_dataset(checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a folder with a gt.txt nor an LMDB"):
        load_script("evaluate").main(["--checkpoint", str(checkpoint), str(tmp_path), "--device", "cpu"])


def test_evaluate_stops_on_a_missing_image_or_skips_it_counted(checkpoint, labelled_dir, tmp_path, capsys):
    broken = tmp_path / "broken"
    (broken / "images").mkdir(parents=True)
    lines = (labelled_dir / "gt.txt").read_text().splitlines()[:3] + ["images/nowhere.png\t123"]
    for path, _ in (line.split("\t") for line in lines[:3]):
        (broken / path).write_bytes((labelled_dir / path).read_bytes())
    (broken / "gt.txt").write_text("\n".join(lines) + "\n")
    evaluate = load_script("evaluate")
    with pytest.raises(BadInputError, match=r"gt\.txt:4: image .*nowhere\.png.* not found .*--skip-bad"):
        evaluate.main(["--checkpoint", str(checkpoint), str(broken), "--device", "cpu"])
    results = evaluate.main(["--checkpoint", str(checkpoint), str(broken), "--device", "cpu", "--skip-bad"])
    assert results[str(broken)]["lines"] == 3 and results[str(broken)]["skipped"] == 1
    assert "skipped 1: missing_image 1" in capsys.readouterr().out


def test_evaluate_reads_paths_outside_the_folder_only_when_allowed(checkpoint, labelled_dir, tmp_path):
    """A gt.txt listing images elsewhere (absolute paths, as some tools write them) is malformed by default, with
    a message naming the flag, and read with --allow-outside-paths."""
    listing = tmp_path / "listing"
    listing.mkdir()
    lines = [line.split("\t") for line in (labelled_dir / "gt.txt").read_text().splitlines()[:4]]
    (listing / "gt.txt").write_text("".join(f"{labelled_dir / path}\t{label}\n" for path, label in lines))
    evaluate = load_script("evaluate")
    with pytest.raises(BadInputError, match=r"gt\.txt:1: image path .* leaves the dataset folder .*--allow-outside"):
        evaluate.main(["--checkpoint", str(checkpoint), str(listing), "--device", "cpu"])
    inside = evaluate.main(["--checkpoint", str(checkpoint), str(labelled_dir), "--device", "cpu"])
    outside = evaluate.main(["--checkpoint", str(checkpoint), str(listing), "--device", "cpu", "--allow-outside-paths"])
    assert outside[str(listing)]["lines"] == 4 and inside[str(labelled_dir)]["lines"] == 13


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_predict_on_gpu_matches_cpu(checkpoint, image_dir):
    predict = load_script("predict")
    on_cpu = predict.main(["--checkpoint", str(checkpoint), str(image_dir), "--device", "cpu"])
    on_gpu = predict.main(["--checkpoint", str(checkpoint), str(image_dir), "--device", "cuda"])
    assert [r[:2] for r in on_gpu] == [r[:2] for r in on_cpu]
    np.testing.assert_allclose([r[2] for r in on_gpu], [r[2] for r in on_cpu], rtol=1e-3)


def test_export_onnx_matches_pytorch(checkpoint, image_dir, tmp_path, capsys):
    output = tmp_path / "crnn.onnx"
    export_onnx = load_script("export_onnx")
    assert export_onnx.main(["--checkpoint", str(checkpoint), "--output", str(output)]) == 0
    assert output.stat().st_size > 10_000 and "max abs diff" in capsys.readouterr().out
    # checked here too, not only by the script's own comparison: a padded batch of real images of other widths
    module = load_recognizer(checkpoint)
    batch = collate_lines([{"image": read_image(path, module), "text": "", "target": torch.empty(0, dtype=torch.long)}
                           for path in sorted(image_dir.glob("*.png"))])
    session = export_onnx.onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    onnx_log_probs, onnx_lengths = session.run(None, {"images": batch["images"].numpy(),
                                                      "widths": batch["widths"].numpy()})
    with torch.no_grad():
        log_probs, lengths = module(batch["images"], batch["widths"])
    assert onnx_lengths.tolist() == lengths.tolist()
    for b, length in enumerate(lengths.tolist()):
        np.testing.assert_allclose(onnx_log_probs[:length, b], log_probs[:length, b].numpy(), atol=1e-4)
    # and the script fails when the two differ by more than its tolerance
    assert export_onnx.main(["--checkpoint", str(checkpoint), "--output", str(output), "--tolerance", "-1"]) == 1


@pytest.mark.parametrize("rnn", ["lstm", "gru"])
def test_export_keeps_packed_semantics_for_stacked_rnns(rnn, tmp_path):
    """Two bidirectional layers: padding must not leak into the backward direction of shorter lines."""
    export_onnx = load_script("export_onnx")
    network = CRNN(11, channels=(8, 16, 16, 32, 32), rnn=rnn, rnn_hidden=16, rnn_layers=2).eval()
    export_onnx.export(network, tmp_path / "net.onnx", channels=1, height=32)
    session = export_onnx.onnxruntime.InferenceSession(str(tmp_path / "net.onnx"), providers=["CPUExecutionProvider"])
    images = export_onnx.sample_images("0123456789", 1, 32, count=4, seed=1)
    assert export_onnx.max_abs_diff(network, session, images) < 1e-4


def test_plot_alignment_shows_the_blank_and_the_strongest_classes_of_large_charsets():
    plot_alignment = load_script("plot_alignment")
    probs, gamma = np.zeros((5, 40)), np.zeros((5, 40))
    probs[:, 0], probs[2, 39], gamma[3, 7] = 1.0, 0.5, 0.9
    rows = plot_alignment.shown_classes(probs, gamma, blank=0)
    assert len(rows) == plot_alignment.MAX_ROWS and rows == sorted(rows) and {0, 7, 39} <= set(rows)
    assert plot_alignment.shown_classes(probs[:, :11], gamma[:, :11], blank=0) == list(range(11))


def test_plot_alignment_computes_what_it_draws(checkpoint, image_dir):
    """γ from either CTC, the -log p from F.ctc_loss, a Viterbi path that spells the text, probabilities per frame."""
    plot_alignment = load_script("plot_alignment")
    module = load_recognizer(checkpoint)
    image, text = read_image(image_dir / "line2.png", module), "4071"
    builtin, python = (plot_alignment.align(module, image, text, ctc) for ctc in ("builtin", "python"))
    np.testing.assert_allclose(python.gamma, builtin.gamma, atol=1e-5)
    np.testing.assert_allclose(builtin.gamma.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(builtin.probs.sum(1), 1.0, atol=1e-5)
    with torch.no_grad():
        log_probs, lengths = module(image[None], torch.tensor([image.shape[-1]]))
    expected = F.ctc_loss(log_probs.double(), torch.tensor([[5, 1, 8, 2]]), lengths, torch.tensor([4]), reduction="sum")
    assert builtin.nll == pytest.approx(expected.item(), rel=1e-4) and python.nll == pytest.approx(builtin.nll, rel=1e-4)
    collapsed = [c for i, c in enumerate(builtin.path) if c != 0 and (i == 0 or c != builtin.path[i - 1])]
    assert module.charset.decode(collapsed) == text and len(builtin.path) == lengths.item()


@pytest.mark.parametrize("ctc", ["builtin", "python"])
def test_plot_alignment_writes_a_png(checkpoint, image_dir, tmp_path, ctc):
    output = tmp_path / "alignment.png"
    load_script("plot_alignment").main(["--checkpoint", str(checkpoint), "--image", str(image_dir / "line0.png"),
                                   "--text", "0123", "--output", str(output), "--ctc", ctc])
    with Image.open(output) as png:
        assert png.format == "PNG" and png.width > 800 and png.height > 500
    assert output.stat().st_size > 20_000


# --- ctc-crnn, the installed command -----------------------------------------------------------------


def test_ctc_crnn_lists_every_script_and_rejects_an_unknown_tool(capsys):
    cli = load_script("cli")
    tools = {path.stem for path in (ROOT / "scripts").glob("*.py")} - {"__init__", "cli", "options"}
    assert set(cli.TOOLS.values()) == tools
    assert cli.main(["--help"]) == 0
    listed = capsys.readouterr().out
    assert all(f"  {name} " in listed for name in cli.TOOLS)
    assert cli.main(["nope"]) == 2 and "unknown tool 'nope'" in capsys.readouterr().err
    assert cli.main([]) == 2


def test_ctc_crnn_runs_a_tool_as_its_script_does(checkpoint, image_dir, tmp_path, capsys):
    """Same output as predict.main; a tool's own exit status (export-onnx's failed check) passes through."""
    cli = load_script("cli")
    arguments = ["--checkpoint", str(checkpoint), str(image_dir), "--device", "cpu"]
    assert cli.main(["predict", *arguments]) == 0
    through_cli = capsys.readouterr().out
    load_script("predict").main(arguments)
    assert through_cli == capsys.readouterr().out and through_cli.count("\n") == 5
    with pytest.raises(SystemExit) as exit_status:
        cli.main(["export_onnx", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "m.onnx"),
                  "--tolerance", "-1"])
    assert exit_status.value.code == 1


@pytest.mark.skipif(shutil.which("ctc-crnn") is None, reason="the package is not installed (pip install -e .)")
def test_ctc_crnn_is_an_installed_command():
    result = subprocess.run(["ctc-crnn", "make-lmdb", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("usage: ctc-crnn make-lmdb")


@pytest.fixture(scope="module")
def protocol_dir(labelled_dir, tmp_path_factory) -> Path:
    """Four of labelled_dir's images with labels a digits model cannot emit: a dash, a capital, 40 ones (79 frames
    needed), and one left as it is."""
    directory = tmp_path_factory.mktemp("protocol")
    (directory / "images").mkdir()
    lines = [line.split("\t") for line in (labelled_dir / "gt.txt").read_text().splitlines()[:4]]
    labels = [f"{lines[0][1][0]}-{lines[0][1][1:]}", lines[1][1] + "A", "1" * 40, lines[3][1]]
    for (path, _), label in zip(lines, labels):
        shutil.copy(labelled_dir / path, directory / path)
    (directory / "gt.txt").write_text("".join(f"{path}\t{label}\n" for (path, _), label in zip(lines, labels)))
    return directory


@pytest.mark.parametrize("protocol", ["raw", "caseless", "alnum36"])
def test_evaluate_protocols_and_by_length_against_editdistance(checkpoint, protocol_dir, protocol, capsys):
    """Each protocol's metrics and per-length breakdown, from predict.py's readings scored by editdistance after a
    mapping written out here (lowercase; keep 0-9a-z)."""
    mapping = {"raw": lambda text: text, "caseless": str.lower,
               "alnum36": lambda text: "".join(c for c in text.lower() if c in "0123456789abcdefghijklmnopqrstuvwxyz")}
    lines = [line.split("\t") for line in (protocol_dir / "gt.txt").read_text().splitlines()]
    predicted = {path: text for path, text, _ in load_script("predict").main(
        ["--checkpoint", str(checkpoint), str(protocol_dir / "images"), "--device", "cpu"])}
    pairs = [(mapping[protocol](predicted[str(protocol_dir / path)]), mapping[protocol](label)) for path, label in lines]
    capsys.readouterr()
    results = load_script("evaluate").main(["--checkpoint", str(checkpoint), str(protocol_dir), "--device", "cpu",
                                            "--protocol", protocol, "--by-length"])
    result = results[str(protocol_dir)]
    assert result["lines"] == 4 and result["unemittable"] == 3 and result["protocol"] == protocol
    edits = [editdistance.eval(pred, label) for pred, label in pairs]
    assert result["cer"] == pytest.approx(sum(edits) / sum(len(label) for _, label in pairs))
    assert result["acc"] == pytest.approx(sum(pred == label for pred, label in pairs) / 4)
    lengths = sorted({len(label) for _, label in pairs})
    assert [row["length"] for row in result["by_length"]] == lengths
    for row in result["by_length"]:
        group = [(e, label) for e, (_, label) in zip(edits, pairs) if len(label) == row["length"]]
        assert row["lines"] == len(group)
        assert row["cer"] == pytest.approx(sum(e for e, _ in group) / max(1, sum(len(label) for _, label in group)))
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith(f"{protocol_dir}\tlines=4 cer={result['cer']:.4f} acc=")
    assert f"protocol={protocol} unemittable=3" in printed[0]
    assert [line.split("\t")[0] for line in printed[1:]] == [f"  length={length}" for length in lengths]


def test_evaluate_nfkc_reads_compatibility_forms_as_plain(checkpoint, protocol_dir, tmp_path):
    """Full-width digits (U+FF10..) as labels: no reading matches them as they are; under --nfkc the metrics are
    those of the same images labelled with ASCII digits."""
    lines = [line.split("\t") for line in (protocol_dir / "gt.txt").read_text().splitlines()]
    digit_lines = [(path, label) for path, label in lines if label.isdigit()]
    folders = {}
    for name, convert in (("ascii", str), ("full_width", lambda label: "".join(chr(0xFF10 + int(c)) for c in label))):
        folders[name] = tmp_path / name
        shutil.copytree(protocol_dir / "images", folders[name] / "images")
        (folders[name] / "gt.txt").write_text("".join(f"{path}\t{convert(label)}\n" for path, label in digit_lines))
    evaluate = load_script("evaluate")

    def result(name, *options):
        return evaluate.main(["--checkpoint", str(checkpoint), str(folders[name]), "--device", "cpu", *options])[
            str(folders[name])]

    ascii_digits, as_is, folded = result("ascii"), result("full_width"), result("full_width", "--nfkc")
    assert len(digit_lines) == 2 and as_is["acc"] == 0 and as_is["unemittable"] == 2
    assert folded["protocol"] == "raw+nfkc" and folded["unemittable"] == 2  # the model still cannot emit them
    assert {k: folded[k] for k in ("cer", "acc", "ned")} == {k: ascii_digits[k] for k in ("cer", "acc", "ned")}
