"""The clip family: parity with transformers' CLIPModel + CLIPProcessor, learning a tiny synthetic
image-text matching problem through the CLI, the image data builders on small fixtures, bad input."""

import gzip
import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from chatsmith.checkpoint import load_model, save_checkpoint
from chatsmith.clip_engine import ClipEngine, recall_at_k, train_caption_tokenizer, write_processor_files
from chatsmith.data import images as im
from chatsmith.errors import UserError
from chatsmith.model import registry
from chatsmith.train.clip import clip_loss
from conftest import cli

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
SHAPES = ("square", "circle")


def synthetic_image(colour, shape, rng, size=16):
    """A coloured square or disc on a noisy grey background."""
    a = rng.integers(90, 140, (size, size, 3)).astype(np.uint8)
    yy, xx = np.mgrid[:size, :size]
    c = size / 2 + rng.uniform(-1.5, 1.5, 2)
    r = size * 0.3
    mask = (np.abs(yy - c[0]) < r) & (np.abs(xx - c[1]) < r) if shape == "square" else (yy - c[0]) ** 2 + (xx - c[1]) ** 2 < r * r
    a[mask] = COLOURS[colour]
    return a


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    """A user's captions.jsonl folder: 4 colours (the shape varies, captions do not say it), 24 images
    each, in mixed modes and sizes."""
    d = tmp_path_factory.mktemp("synth")
    rng = np.random.default_rng(0)
    lines = []
    for k, colour in enumerate(COLOURS):
        for j in range(24):
            shape = SHAPES[j % 2]
            a = synthetic_image(colour, shape, rng, size=16 if j % 3 else 24)  # some are resized
            img = Image.fromarray(a)
            name = f"img_{k}_{j}.png"
            if j % 4 == 1:
                img = img.convert("RGBA")
            elif j % 4 == 2:
                img = img.convert("P")
            img.save(d / name)
            lines.append({"image": name, "text": [f"a {colour} thing", f"a picture of something {colour}"]})
    (d / "captions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return d


@pytest.fixture(scope="module")
def trained(synth_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cliprun") / "model"
    assert cli("clip", "train", "--data", synth_dir, "--val", synth_dir, "--out", out, "--preset", "micro",
               "--image-size", 16, "--patch-size", 4, "--vocab-size", 300, "--batch-size", 32, "--max-steps", 120,
               "--lr", "3e-3", "--warmup-steps", 10, "--eval-every", 60, "--eval-batches", 2, "--save-every", 60,
               "--log-every", 10, "--device", "cpu") == 0
    return out


def _tiny_model_dir(tmp_path, captions):
    tok_dir = tmp_path / "tok"
    train_caption_tokenizer(captions, 300).save(tok_dir)
    from chatsmith.tokenizer import Tokenizer

    tok = Tokenizer.load(tok_dir)
    cfg = registry.preset("micro", family="clip", vocab_size=320, image_size=32, patch_size=8,
                          bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    write_processor_files(tok_dir, cfg)
    torch.manual_seed(0)
    m = registry.build(cfg).eval()
    with torch.no_grad():  # a trained-looking logit scale and non-trivial norms
        m.logit_scale.fill_(3.0)
        for ln in (m.vision_model.post_layernorm, m.text_model.final_layer_norm):
            ln.weight.normal_(1.0, 0.2)
            ln.bias.normal_(0.0, 0.2)
    d = tmp_path / "model"
    save_checkpoint(d, m, tokenizer_dir=tok_dir)
    return d, m, tok


def test_parity_with_transformers_clip_model_and_processor(tmp_path):
    transformers = pytest.importorskip("transformers")
    captions = ["a photo of a cat", "一只猫的照片", "a red heart", "a dog on the grass, running"]
    d, m, tok = _tiny_model_dir(tmp_path, captions * 5)
    hf = transformers.CLIPModel.from_pretrained(d).eval()
    proc = transformers.CLIPProcessor.from_pretrained(d)
    rng = np.random.default_rng(1)
    pics = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in ((32, 32), (40, 56), (64, 48))]
    pics.append(Image.fromarray(rng.integers(0, 255, (33, 33, 4), dtype=np.uint8), "RGBA"))
    engine = ClipEngine(m, tok)
    ours_px = engine.pixels([im.to_rgb(p, "test") for p in pics])
    inputs = proc(text=captions, images=[im.to_rgb(p, "test") for p in pics], return_tensors="pt", padding=True)
    assert torch.allclose(inputs["pixel_values"], ours_px, atol=1e-5), "preprocessor_config.json != our preprocessing"
    ours_ids = engine.token_ids(captions)
    for row, ref, mask in zip(ours_ids, inputs["input_ids"], inputs["attention_mask"]):
        assert row[:int(mask.sum())].tolist() == ref[:int(mask.sum())].tolist()
    with torch.no_grad():
        o = hf(**inputs)
        img, txt = m.encode_image(ours_px), m.encode_text(ours_ids)
        assert (o.image_embeds - img).abs().max() <= 1e-4
        assert (o.text_embeds - txt).abs().max() <= 1e-4
        assert (o.logits_per_image - m(ours_px, ours_ids)).abs().max() <= 1e-3
        # unnormalised projections too (get_*_features), and the reload through our own loader
        feats = hf.get_image_features(pixel_values=ours_px)
        feats = getattr(feats, "pooler_output", feats)
        assert (feats - m.encode_image(ours_px, normalize=False)).abs().max() <= 1e-4
        m2 = load_model(d)
        assert torch.equal(m2.encode_text(ours_ids), txt)


def test_text_pools_at_first_eos_and_ignores_padding():
    cfg = registry.preset("micro", family="clip", vocab_size=64)
    torch.manual_seed(0)
    m = registry.build(cfg).eval()
    a = torch.tensor([[0, 5, 6, 1, 2, 2]])
    b = torch.tensor([[0, 5, 6, 1, 9, 9]])  # different tokens after EOS: not read
    c = torch.tensor([[0, 5, 7, 1, 2, 2]])
    with torch.no_grad():
        assert torch.allclose(m.encode_text(a), m.encode_text(b))
        assert not torch.allclose(m.encode_text(a), m.encode_text(c))


def test_loss_is_symmetric_infonce_with_shared_label_targets():
    logits = torch.randn(4, 4)
    y = torch.arange(4)
    ref = (torch.nn.functional.cross_entropy(logits, y) + torch.nn.functional.cross_entropy(logits.T, y)) / 2
    assert torch.allclose(clip_loss(logits, torch.tensor([0, 1, 2, 3])), ref)
    # two images of one class: both columns are right for either row, so a model scoring them alike
    # is at the optimum (no gradient), where CLIP's one-hot loss would push the two apart
    lab = torch.tensor([0, 0, 1, 2])
    big = torch.full((4, 4), -10.0)
    big[:2, :2] = 10.0
    big[2, 2] = big[3, 3] = 10.0
    for labels, pushed in ((lab, False), (torch.arange(4), True)):
        x = big.clone().requires_grad_()
        clip_loss(x, labels).backward()
        assert (x.grad[0, 1] > 0.05) == pushed


def test_learns_a_synthetic_matching_problem(trained, synth_dir, tmp_path):
    rows = [json.loads(x) for x in (trained / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    # from ~ln 32 (chance) towards ln 8 (a batch of 32 holds ~8 images of each colour)
    assert losses[-1] < losses[0] - 0.5, losses
    for f in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json", "train_summary.json"):
        assert (trained / f).exists(), f
    engine = ClipEngine.load(trained)
    s = im.read_set(synth_dir)
    labels = list(COLOURS)
    prompts = [[f"a {x} thing", f"a picture of something {x}"] for x in labels]
    iv = engine.embed_images(s.images)
    pred = (iv @ engine.class_vectors(prompts).T).argmax(1)
    truth = np.array([labels.index(t[0].split()[1]) for t in s.texts])
    assert (pred == truth).mean() >= 0.9  # chance: 1/4
    # fresh images it never saw
    rng = np.random.default_rng(7)
    fresh = [synthetic_image(c, sh, rng) for c in COLOURS for sh in SHAPES]
    pred = (engine.embed_images(fresh) @ engine.class_vectors(prompts).T).argmax(1)
    assert (pred == np.repeat(np.arange(4), 2)).mean() >= 0.75
    # eval --tasks clip:DIR: labels repeat (4 colours), so zero-shot over them; its figures are written
    assert cli("eval", trained, "--tasks", f"clip:{synth_dir}", "--out", tmp_path / "ev") == 0
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    r = m["tasks"][f"{synth_dir.name}_zero_shot"]
    assert r["n"] == 96 and r["accuracy"] > 0.5 and np.sum(r["confusion_matrix"]) == 96
    fig = json.loads((tmp_path / "ev" / "clip_figures.json").read_text())[synth_dir.name]
    assert len(fig["matches"]) == 4 and len(fig["confusion"]["labels"]) == 4
    assert (tmp_path / "ev" / "clip_figures.json").exists()


def test_resume_continues_the_run(trained, synth_dir):
    assert cli("clip", "train", "--data", synth_dir, "--out", trained, "--preset", "micro", "--image-size", 16,
               "--patch-size", 4, "--batch-size", 32, "--max-steps", 130, "--lr", "3e-3", "--warmup-steps", 10,
               "--save-every", 60, "--log-every", 10, "--device", "cpu", "--resume") == 0
    state = json.loads((trained / "trainer_state.json").read_text())
    assert state["step"] == 130


def test_classify_search_embed_verbs(trained, synth_dir, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for c in ("red", "blue"):
        Image.fromarray(synthetic_image(c, "square", rng)).save(folder / f"{c}.png")
    capsys.readouterr()
    assert cli("clip", "classify", trained, "--images", folder, "--labels", "red thing,blue thing",
               "--template", "a {}", "--template", "a picture of a {}") == 0
    out = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert {o["image"].rsplit("/", 1)[1]: o["label"] for o in out} == {"red.png": "red thing", "blue.png": "blue thing"}
    assert cli("clip", "search", trained, "--images", folder, "--query", "a picture of something blue", "--top-k", 1,
               "--grid", tmp_path / "g.png") == 0
    hit = json.loads(capsys.readouterr().out.splitlines()[0])
    assert hit["image"].endswith("blue.png")
    assert Image.open(tmp_path / "g.png").size[0] > 64
    assert cli("clip", "embed", trained, "--images", folder, "--text", "a red square", "--out", tmp_path / "v.npy") == 0
    v = np.load(tmp_path / "v.npy")
    assert v.shape[0] == 3 and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    assert len((tmp_path / "v.index.jsonl").read_text().splitlines()) == 3
    # bad input: exit 2, one line, nothing written
    for labels in ("", "red", " , blue", "red,red"):
        assert cli("clip", "classify", trained, "--images", folder, "--labels", labels, "--out", tmp_path / "c.jsonl") == 2
    assert not (tmp_path / "c.jsonl").exists()
    assert cli("clip", "classify", trained, "--images", folder, "--labels", "a,b", "--template", "no slot") == 2
    assert cli("clip", "search", trained, "--images", folder, "--query", "  ") == 2
    assert cli("generate", trained, "--prompt", "hi") == 2  # a clip model writes no text: said so
    assert cli("eval", trained, "--tasks", "clip", "--images-root", tmp_path / "none") == 2
    assert cli("eval", trained, "--tasks", "clip", "quiz") == 2
    (folder / "broken.png").write_bytes((folder / "red.png").read_bytes()[:60])  # truncated
    assert cli("clip", "embed", trained, "--images", folder, "--out", tmp_path / "w.npy") == 2
    assert "broken.png" in capsys.readouterr().err
    assert not (tmp_path / "w.npy").exists()


# --- images: decoding and user data ------------------------------------------------------------

def _png(img) -> bytes:
    b = io.BytesIO()
    img.save(b, format="PNG")
    return b.getvalue()


def test_odd_modes_convert_and_bad_images_refuse(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent: white, as transformers does
    assert im.read_image(_png(rgba)).getpixel((0, 0)) == (255, 255, 255)
    assert im.read_image(_png(Image.new("L", (8, 8), 7))).getpixel((0, 0)) == (7, 7, 7)
    assert im.read_image(_png(Image.new("1", (8, 8), 1))).mode == "RGB"
    a16 = Image.fromarray(np.full((8, 8), 40000, np.uint16))
    assert im.read_image(_png(a16)).getpixel((0, 0))[0] == 255
    cmyk = io.BytesIO()
    Image.new("CMYK", (8, 8), (0, 255, 0, 0)).save(cmyk, format="JPEG")
    assert im.read_image(cmyk.getvalue()).mode == "RGB"
    with pytest.raises(UserError, match="float"):
        im.to_rgb(Image.new("F", (8, 8)), "x.tif")
    with pytest.raises(UserError, match="2x2"):
        im.read_image(_png(Image.new("RGB", (2, 2))), "tiny.png")
    with pytest.raises(UserError, match="not an image"):
        im.read_image(b"hello world", "notes.png")
    with pytest.raises(UserError, match="truncated"):
        im.read_image(_png(Image.new("RGB", (64, 64), (1, 2, 3)))[:80], "cut.png")


def test_user_sets_name_the_line_and_read_class_folders(tmp_path):
    d = tmp_path / "caps"
    d.mkdir()
    Image.new("RGB", (8, 8)).save(d / "a.png")
    (d / "captions.jsonl").write_text('{"image": "a.png", "text": "a black square"}\n\n'
                                      '{"image": "gone.png", "text": "missing"}\n')
    with pytest.raises(UserError, match=r"captions.jsonl:3: image 'gone.png' not found"):
        im.read_set(d)
    (d / "captions.jsonl").write_text('{"image": "a.png", "text": ""}\n')
    with pytest.raises(UserError, match="captions.jsonl:1: text"):
        im.read_set(d)
    (d / "captions.jsonl").write_text('{"image": "a.png"\n')
    with pytest.raises(UserError, match="captions.jsonl:1: not JSON"):
        im.read_set(d)
    assert cli("clip", "train", "--data", d, "--out", tmp_path / "run", "--max-steps", 1) == 2
    assert not (tmp_path / "run").exists()  # nothing half-written
    f = tmp_path / "folders"
    for c in ("cat", "running_shoe"):
        (f / c).mkdir(parents=True)
        Image.new("RGB", (10, 12)).save(f / c / "1.png")
    s = im.read_set(f)
    assert s.labels == ["cat", "running shoe"] and "a photo of a running shoe." in s.texts[1]


def test_preprocess_matches_the_processor_recipe():
    a = np.arange(40 * 60 * 3, dtype=np.uint8).reshape(40, 60, 3)
    x = im.preprocess([a], 20, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert x.shape == (1, 3, 20, 20)
    ref = np.asarray(Image.fromarray(a).resize((30, 20), Image.Resampling.BICUBIC))[:, 5:25]
    assert np.allclose(x[0], (ref.transpose(2, 0, 1) / 255.0 - 0.5) / 0.5, atol=1e-6)


# --- the built-in builders on fixtures -----------------------------------------------------------

def _idx(path, arr):
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_fashion_builder_holds_out_classes(tmp_path):
    src = tmp_path / "fm"
    src.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 20)):
        _idx(src / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)))
        _idx(src / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    meta = im.build_fashion(tmp_path / "out", src)
    train, test = im.read_set(tmp_path / "out/train"), im.read_set(tmp_path / "out/test")
    assert meta["counts"] == {"train": 28, "test": 20}
    assert not set(im.HELD_OUT) & set(train.labels) and set(im.HELD_OUT) <= set(test.labels)
    assert not any(h in t for ts in train.texts for t in ts for h in im.HELD_OUT)  # names never trained on
    assert np.asarray(train.images).shape == (28, 28, 28, 3)
    caps = train.texts[0]
    assert any("T恤" in c for c in caps) and any("photo" in c for c in caps)
    assert [s for s, lab in zip(test.seen, test.labels) if lab in im.HELD_OUT] == [False] * 6
    _idx(src / "t10k-images-idx3-ubyte.gz", rng.integers(0, 255, (20, 28, 28)))
    (src / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(gzip.decompress(
        (src / "t10k-images-idx3-ubyte.gz").read_bytes())[:500]))
    with pytest.raises(UserError, match="truncated"):
        im.build_images(tmp_path / "out2", tmp_path, fashion_dir=src)
    assert not (tmp_path / "out2/images/fashion").exists()  # nothing half-built


def _tgz(path, files: dict):
    with tarfile.open(path, "w:gz") as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


def test_emoji_builder_splits_and_holds_out_food(tmp_path):
    png = _png(Image.new("RGBA", (64, 64), (200, 0, 0, 255)))
    en = [{"label": "grinning face", "hexcode": "1F600", "group": 0, "tags": ["face", "grin"]},
          {"label": "red apple", "hexcode": "1F34E", "group": 4, "tags": ["apple", "fruit"]},
          {"label": "keycap: 1", "hexcode": "0031-FE0F-20E3", "group": 8, "tags": ["keycap"]},
          {"label": "smiling face with horns", "hexcode": "1F608", "group": 0, "tags": ["devil"]},
          {"label": "no image", "hexcode": "1FAAA", "group": 7}]
    zh = [{"label": "笑脸", "hexcode": "1F600", "tags": ["脸"]}, {"label": "红苹果", "hexcode": "1F34E"}]
    _tgz(tmp_path / im.EMOJI_PACKAGES[0], {"package/img/google/64/1f600.png": png, "package/img/google/64/1f34e.png": png,
                                           "package/img/google/64/0031-fe0f-20e3.png": png,
                                           "package/img/google/64/1f608.png": png,
                                           "package/img/google/32/1f600.png": png})
    _tgz(tmp_path / im.EMOJI_PACKAGES[1], {"package/en/data.json": json.dumps(en).encode(),
                                           "package/zh/data.json": json.dumps(zh).encode()})
    meta = im.build_emoji(tmp_path / "out", tmp_path)
    assert meta["counts"] == {"train": 2, "test": 1, "heldout": 1} and meta["skipped"] == 1
    held = im.read_set(tmp_path / "out/heldout")
    assert held.labels == ["red apple"] and "红苹果的表情符号" in held.texts[0] and held.seen == [False]
    assert im.read_set(tmp_path / "out/test").labels == ["smiling face with horns"]  # 0x1F608 % 10 == 0
    (tmp_path / im.EMOJI_PACKAGES[1]).unlink()
    with pytest.raises(UserError, match="npm pack emojibase-data"):
        im.build_emoji(tmp_path / "out3", tmp_path)


def test_recall_at_k_counts_any_caption_of_an_image():
    iv = np.eye(3, dtype=np.float32)
    texts = [["a", "a2"], ["b"], ["c"]]
    a2 = np.array([0.3, 0.9, 0.0], np.float32)  # "a2" looks more like image 1 than like its own image 0
    tv = np.stack([iv[0], a2, iv[1], iv[2]])
    r = recall_at_k(iv, texts, tv, ks=(1, 2))
    assert r["image_to_text_r@1"] == 1.0  # every image's best caption is one of its own
    assert r["text_to_image_r@1"] == 0.75 and r["text_to_image_r@2"] == 1.0


def test_report_draws_matches_and_confusion(trained, synth_dir):
    assert cli("eval", trained, "--tasks", f"clip:{synth_dir}") == 0  # into MODEL/eval, where the report looks
    assert cli("report", trained) == 0
    md = (trained / "report.md").read_text()
    pngs = sorted(p.name for p in trained.glob("clip_*.png"))
    assert [p.split("_")[1] for p in pngs] == ["confusion", "matches"], pngs
    for p in pngs:
        assert p in md
        assert Image.open(trained / p).size[0] > 200
