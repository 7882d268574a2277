"""The data engine: the annotation folder, its server and page in headless Chromium, COCO in and out, the
fully automatic stage writing the same folders, and fine-tuning on what was annotated.

The page's model is the shipped toy student, exported by the demo's bundle; masks are checked against
``Predictor.predict`` on the prompts each saved object records.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import fails_in_one_line, open_page, predicted, run_script_ok
from PIL import Image
from safetensors.torch import load_file

from tinysam import Predictor
from tinysam.annotate import AnnotateServer, AnnotationStore, ConflictError, Proposer, export_coco, import_coco
from tinysam.annotate.store import AnnotationError
from tinysam.assets import asset_path
from tinysam.data.masks import decode_rle, encode_rle
from tinysam.data.sa1b import SA1BDataset
from tinysam.data.toyworld import ToyWorldConfig, generate_image, image_rng
from tinysam.demo import prepare
from tinysam.loader import load_model

STUDENT = asset_path("toy_student.safetensors")
TOY_THRESHOLDS = {"pred_iou_thresh": 0.7, "stability_score_thresh": 0.85}


@pytest.fixture(scope="module")
def toys() -> list:
    return [generate_image(image_rng(0, "val", i), ToyWorldConfig(out="unused")) for i in range(4)]


@pytest.fixture()
def folder(tmp_path, toys) -> Path:
    """Four toy images and a file that is not an image."""
    images = tmp_path / "images"
    images.mkdir()
    for i, toy in enumerate(toys):
        Image.fromarray(toy.image).save(images / f"toy_{i}.png")
    (images / "broken.png").write_text("not pixels")
    return images


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return prepare(STUDENT, "tinyvit_toy", None, "browser", tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def model():
    return load_model("tinyvit_toy", STUDENT)


@pytest.fixture(scope="module")
def proposer(model) -> Proposer:
    return Proposer(model, TOY_THRESHOLDS, points_per_side=16)


def mask_object(mask: np.ndarray, **extra) -> dict:
    return {"segmentation": encode_rle(mask), "point_coords": [], "source": "manual", **extra}


# ---- the folder -------------------------------------------------------------------------------


def test_store_saves_sa1b_records_under_a_version_check(folder, tmp_path, toys):
    out = tmp_path / "out"
    store = AnnotationStore(folder, out)
    rows = {row["stem"]: row for row in store.listing()}
    assert rows["broken"]["state"] == "unreadable image" and "broken.png" in rows["broken"]["error"]
    assert {rows[f"toy_{i}"]["state"] for i in range(4)} == {"not started"}
    with pytest.raises(AnnotationError, match="broken.png"):
        store.save("broken", [], version="")
    with pytest.raises(KeyError):
        store.read("../images/toy_0")
    objects = [
        mask_object(t.mask, category="blob", point_coords=[list(t.point)], point_labels=[1]) for t in toys[0].instances
    ]
    version = store.save("toy_0", objects, version="")
    view = store.read("toy_0")
    assert view["version"] == version and view["state"] == "in progress" and len(view["objects"]) == len(objects)
    for saved, t in zip(view["objects"], toys[0].instances):
        assert np.array_equal(decode_rle(saved["segmentation"]), t.mask)
        assert saved["area"] == t.mask.sum() and saved["category"] == "blob" and saved["source"] == "manual"
    assert (out / "toy_0.png").read_bytes() == (folder / "toy_0.png").read_bytes()  # the image beside its JSON
    with pytest.raises(ConflictError, match="changed since"):  # a second tab that read the empty image
        store.save("toy_0", objects[:1], version="")
    assert len(store.read("toy_0")["objects"]) == len(objects)
    store.save("toy_0", objects[:1], version=version, state="done")
    assert store.listing()[1] == {"stem": "toy_0", "name": "toy_0.png", "state": "done", "error": None, "objects": 1}
    with pytest.raises(AnnotationError, match="size"):
        store.save("toy_1", [mask_object(np.ones((10, 10), bool))], version="")
    with pytest.raises(AnnotationError, match="source"):
        store.save("toy_1", [mask_object(toys[1].instances[0].mask, source="robot")], version="")
    with pytest.raises(AnnotationError, match="empty"):
        store.save("toy_1", [mask_object(np.zeros((256, 256), bool))], version="")
    dataset = SA1BDataset(out, image_size=256, min_mask_area=0)
    assert dataset.names() == ["toy_0"] and len(dataset[0]["boxes"]) == 1


def test_corrupt_or_foreign_json_is_reported_and_kept_until_the_annotator_agrees(folder, tmp_path, toys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "toy_1.json").write_text("{ not json")
    (out / "toy_2.json").write_text(json.dumps({"image": {"height": 10, "width": 10}, "annotations": []}))
    store = AnnotationStore(folder, out)
    for stem, reason in (("toy_1", "malformed JSON"), ("toy_2", "describes a 10x10 image")):
        view = store.read(stem)
        assert view["state"] == "unreadable annotations" and reason in view["error"], view
        before = (out / f"{stem}.json").read_bytes()
        with pytest.raises(ConflictError, match="confirm to replace it"):
            store.save(stem, [mask_object(toys[1].instances[0].mask)], view["version"])
        assert (out / f"{stem}.json").read_bytes() == before
        store.save(stem, [mask_object(toys[1].instances[0].mask)], view["version"], replace=True)
        assert store.read(stem)["state"] == "in progress"
        assert (out / f"{stem}.json.replaced-{view['version'][:12]}").read_bytes() == before


def test_fully_automatic_stage_writes_folders_the_annotator_opens(folder, tmp_path):
    """evaluate.py task=everything writes SA-1B JSONs that open as proposals; the annotator's folder trains."""
    out = tmp_path / "auto"
    run_script_ok(
        "evaluate.py",
        [
            "task=everything",
            f"images={folder}",
            f"out={out}",
            "mode=adaptive",
            "task.generator.points_per_side=8",
            f"checkpoint={STUDENT}",
            "model=tinyvit_toy",
            "annotations=null",
            f"paths.root_dir={tmp_path}",
        ],
        tmp_path,
    )
    store = AnnotationStore(folder, out)
    view = store.read("toy_0")
    assert view["state"] == "in progress" and view["objects"], view.get("error")
    assert {o["source"] for o in view["objects"]} == {"auto"}
    assert store.read("broken")["state"] == "unreadable image"
    coco = tmp_path / "coco.json"
    counts = export_coco(out, coco)
    assert counts["images"] == 4 and counts["annotations"] == sum(
        len(store.read(f"toy_{i}")["objects"]) for i in range(4)
    )


def test_coco_export_and_import_round_trip(folder, tmp_path, toys):
    out, again = tmp_path / "out", tmp_path / "again"
    store = AnnotationStore(folder, out)
    for i in range(2):
        objects = [mask_object(t.mask, category=f"kind{k % 2}") for k, t in enumerate(toys[i].instances)]
        store.save(f"toy_{i}", objects, version="")
    (out / "junk.json").write_text("[]")  # reported, not exported
    coco = tmp_path / "instances.json"
    counts = export_coco(out, coco)
    assert counts["images"] == 2 and counts["categories"] == 2 and "junk.json" in counts["skipped"]
    data = json.loads(coco.read_text())
    assert {c["name"] for c in data["categories"]} == {"kind0", "kind1"}
    target = AnnotationStore(folder, again)
    target.save("toy_1", [mask_object(toys[1].instances[0].mask)], version="")  # already annotated: kept
    counts = import_coco(coco, target)
    assert counts["imported"] == 1 and counts["already annotated"] == 1
    imported = target.read("toy_0")["objects"]
    assert [o["source"] for o in imported] == ["imported"] * len(toys[0].instances)
    for obj, t, k in zip(imported, toys[0].instances, range(99)):
        assert np.array_equal(decode_rle(obj["segmentation"]), t.mask) and obj["category"] == f"kind{k % 2}"
    assert len(target.read("toy_1")["objects"]) == 1
    fails_in_one_line(
        ["-m", "tinysam.annotate", "import-coco", f"images={folder}", f"out={again}", f"coco={tmp_path / 'none.json'}"],
        tmp_path,
        "none.json",
    )


# ---- the server ------------------------------------------------------------------------------


def request(server, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    host, port = server.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=60)
    connection.request(method, path, body=body, headers=headers or {})  # sent as given: no ".." normalisation
    response = connection.getresponse()
    return response.status, response.read()


def test_server_reaches_only_listed_images_writes_only_out_and_caps_requests(bundle, folder, tmp_path, toys):
    store = AnnotationStore(folder, tmp_path / "out")
    with AnnotateServer(bundle, store, None, port=0, max_request_bytes=200_000) as server:
        assert server.server_address[0] == "127.0.0.1"
        status, body = request(server, "GET", "/")
        assert status == 200 and b"TinySAM annotator" in body
        listing = json.loads(request(server, "GET", "/api/images")[1])
        assert [r["stem"] for r in listing["images"]] == ["broken", "toy_0", "toy_1", "toy_2", "toy_3"]
        status, body = request(server, "GET", "/api/images/toy_0/file")
        assert status == 200 and body == (folder / "toy_0.png").read_bytes()
        for path in [
            "/api/images/../../etc/passwd/file",
            "/api/images/..%2F..%2Fetc%2Fpasswd/file",
            "/api/annotations/..%2Fimages%2Ftoy_0",
            "/api/annotations/%2Fetc%2Fpasswd",
            "/static/../server.py",
        ]:
            assert request(server, "GET", path)[0] == 404, path
        save = json.dumps({"version": "", "objects": [], "state": "in progress"}).encode()
        for path in ["/api/annotations/..%2F..%2Fescaped", "/api/annotations/%2Ftmp%2Fescaped"]:
            assert request(server, "PUT", path, save)[0] in (404, 405)  # no route, or no such image
        assert not list(tmp_path.glob("escaped*")) and not Path("/tmp/escaped.json").exists()
        status, body = request(server, "PUT", "/api/annotations/toy_0", b"x" * 200_001)
        assert status == 413 and b"limit" in body
        status, body = request(server, "PUT", "/api/annotations/toy_0", b"{}")
        assert status == 400 and b"version" in body
        objects = [mask_object(toys[0].instances[0].mask)]
        status, body = request(
            server, "PUT", "/api/annotations/toy_0", json.dumps({"version": "", "objects": objects}).encode()
        )
        assert status == 200
        status, body = request(
            server, "PUT", "/api/annotations/toy_0", json.dumps({"version": "", "objects": objects}).encode()
        )
        assert status == 409 and b"changed since" in body
        assert request(server, "POST", "/api/propose/toy_0", b"{}")[0] == 404  # no model in Python: no proposals
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".annotate.lock", "toy_0.json", "toy_0.png"]


def test_proposals_for_one_image_and_the_whole_folder(bundle, folder, tmp_path, proposer, toys):
    store = AnnotationStore(folder, tmp_path / "out")
    store.save("toy_3", [mask_object(toys[3].instances[0].mask)], version="")
    with AnnotateServer(bundle, store, proposer, port=0) as server:
        status, body = request(server, "POST", "/api/propose/toy_0", json.dumps({"pred_iou_thresh": 0.5}).encode())
        assert status == 200
        result = json.loads(body)
        assert result["thresholds"] == {"pred_iou_thresh": 0.5, "stability_score_thresh": 0.85}
        assert result["objects"] and all(o["source"] == "auto" and o["predicted_iou"] >= 0.5 for o in result["objects"])
        assert store.read("toy_0")["state"] == "not started"  # proposals are not saved until the annotator saves
        assert request(server, "POST", "/api/propose/toy_0", b'{"colour": 1}')[0] == 400
        status = json.loads(request(server, "POST", "/api/propose-all", b"{}")[1])
        while status["running"]:
            time.sleep(0.2)
            status = json.loads(request(server, "GET", "/api/propose-all")[1])
    assert status["total"] == 3 and status["written"] == 3  # toy_0-2; toy_3 was started, broken is unreadable
    assert len(store.read("toy_3")["objects"]) == 1
    views = [store.read(stem) for stem in ("toy_0", "toy_1", "toy_2")]
    assert all(view["state"] == "in progress" for view in views)
    proposed = [o for view in views for o in view["objects"]]
    assert proposed and {o["source"] for o in proposed} == {"auto"}


SAVE_LOOP = """
import json, sys, urllib.request
url, body = sys.argv[1], json.loads(open(sys.argv[2]).read())
while True:
    current = json.load(urllib.request.urlopen(url))
    body["version"] = current["version"]
    body["state"] = "done" if current["state"] != "done" else "in progress"
    request = urllib.request.Request(url, json.dumps(body).encode(), method="PUT")
    urllib.request.urlopen(request).read()
    print("saved", flush=True)
"""


def test_server_killed_during_saves_leaves_the_previous_json(folder, tmp_path, bundle, toys):
    """SIGKILL the server while a client saves back to back: the JSON is always one whole save."""
    out = tmp_path / "out"
    store = AnnotationStore(folder, out)
    many = [mask_object(toys[0].instances[k % len(toys[0].instances)].mask) for k in range(300)]
    store.save("toy_0", many, version="")
    body = tmp_path / "body.json"
    body.write_text(json.dumps({"objects": many}))
    cache = bundle.folder.parent
    for delay in (1.0, 1.7, 2.3):
        server = subprocess.Popen(
            [sys.executable, "-m", "tinysam.annotate", f"images={folder}", f"out={out}", "port=0", f"cache={cache}"],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        line = ""
        while "serving at" not in line:
            line = server.stdout.readline()
            assert line, "the server stopped before serving"
        url = line.rsplit(" at ", 1)[1].strip() + "api/annotations/toy_0"
        client = subprocess.Popen(
            [sys.executable, "-c", SAVE_LOOP, url, str(body)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        time.sleep(delay)
        server.send_signal(signal.SIGKILL)
        server.wait()
        assert client.communicate(timeout=30)[0].count("saved") >= 1  # the kill came while saves were going on
        view = AnnotationStore(folder, out).read("toy_0")
        assert view["state"] in ("in progress", "done") and len(view["objects"]) == 300, view.get("error")
    left = len(list(out.glob(".*.tmp")))  # a kill inside a write leaves its temporary file, never read
    assert AnnotationStore(folder, out).clean() == left and not list(out.glob(".*.tmp"))


def test_command_fails_in_one_line(tmp_path, folder):
    fails_in_one_line(
        ["-m", "tinysam.annotate", f"images={tmp_path / 'nowhere'}", f"out={tmp_path}"], tmp_path, "nowhere"
    )
    fails_in_one_line(["-m", "tinysam.annotate", f"images={folder}"], tmp_path, "out missing")
    fails_in_one_line(["-m", "tinysam.annotate", "publish", "out=x"], tmp_path, "unknown command 'publish'")


# ---- the page in Chromium --------------------------------------------------------------------


def open_image(page, stem: str) -> None:
    page.click(f"#images button[data-stem='{stem}']")
    page.evaluate("window.annotator.idle()")


def click(page, x: float, y: float, size=(256, 256), **kwargs) -> None:
    box = page.locator("#view").bounding_box()
    page.mouse.click(box["x"] + x / size[1] * box["width"], box["y"] + y / size[0] * box["height"], **kwargs)
    page.evaluate("window.annotator.idle()")


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def test_annotate_save_reload_propose_and_train_in_the_browser(
    browser, bundle, folder, tmp_path, toys, proposer, model
):
    out = tmp_path / "out"
    store = AnnotationStore(folder, out)
    with AnnotateServer(bundle, store, proposer, port=0) as server:
        page = open_page(browser, server.url, (1400, 1100))
        assert page.inner_text("#images").count("not started") == 4 and "unreadable image" in page.inner_text("#images")
        made = {}
        for i in (0, 1):  # clicks on two ground-truth objects per image, one named
            open_image(page, f"toy_{i}")
            for k, target in enumerate(toys[i].instances[:2]):
                page.click("#new-object")
                click(page, *target.point)
                if k == 0:
                    page.fill("#category", "blob")
            made[f"toy_{i}"] = page.evaluate("window.annotator.objects()")
            assert len(made[f"toy_{i}"]) == 2
            if i == 0:
                page.click("#save")
                page.evaluate("window.annotator.idle()")
                assert "saved 2 objects" in page.inner_text("#message")
        open_image(page, "toy_2")  # leaving toy_1 saved it
        assert "in progress" in page.inner_text("#images button[data-stem='toy_1']")
        page.screenshot(path=str(tmp_path / "annotate.png"))
        page.reload()
        page.wait_for_selector("body[data-ready=true]", timeout=120_000)
        for stem, objects in made.items():
            open_image(page, stem)
            assert page.evaluate("window.annotator.objects()") == objects  # exactly what was saved
        # semi-automatic: propose on a third image, delete one proposal, add one object, save
        open_image(page, "toy_2")
        assert page.input_value("#pred-iou") == "0.7" and page.input_value("#stability") == "0.85"  # the model's own
        page.fill("#stability", "0.7")  # the toy student's stability runs low: 0 proposals here at 0.85
        page.click("#propose")
        page.evaluate("window.annotator.idle()")
        proposed = page.evaluate("window.annotator.objects()")
        assert proposed and {o["source"] for o in proposed} == {"auto"}
        assert page.is_checked("#shade")
        page.click("#objects li:first-child button.delete")
        uncovered = [
            t for t in toys[2].instances if all(iou(decode_rle(o["segmentation"]), t.mask) < 0.5 for o in proposed[1:])
        ]
        target = (uncovered or toys[2].instances)[0]
        page.click("#new-object")
        click(page, *target.point)
        page.click("#save")
        page.evaluate("window.annotator.idle()")
        page.screenshot(path=str(tmp_path / "annotate_proposals.png"))
        saved = store.read("toy_2")["objects"]
        assert len(saved) == len(proposed) and [o["source"] for o in saved] == ["auto"] * (len(proposed) - 1) + [
            "manual"
        ]
        assert page.errors == []
        page.close()
    # the written JSONs are training data, and each manual mask is Predictor.predict's on its prompts
    dataset = SA1BDataset(out, image_size=256, min_mask_area=0, max_masks=100)
    assert dataset.names() == ["toy_0", "toy_1", "toy_2"]
    predictor = Predictor(model)
    for index, stem in enumerate(dataset.names()):
        record = json.loads((out / f"{stem}.json").read_text())
        assert len(dataset[index]["boxes"]) == len(record["annotations"])
        predictor.set_image(toys[int(stem[-1])].image)
        for obj in record["annotations"]:
            if obj["source"] == "manual":
                masks, scores, best = predicted(predictor, obj)
                assert iou(decode_rle(obj["segmentation"]), masks[best]) >= 0.99
                assert abs(obj["predicted_iou"] - scores[best]) < 1e-3
    counts = {s: len(json.loads((out / f"{s}.json").read_text())["annotations"]) for s in dataset.names()}
    store.save("toy_3", [], version="", state="done")  # an image with nothing on it: training skips and counts it
    check_fine_tune(out, tmp_path, record_counts=counts)


def check_fine_tune(out: Path, tmp_path: Path, record_counts: dict) -> None:
    """experiment=finetune_masks on the annotated folder: the weights move and every saved object is read."""
    printed = run_script_ok(
        "train.py",
        [
            "experiment=finetune_masks",
            "student=tinyvit_toy",
            f"student.checkpoint={STUDENT}",
            f"data.train_dirs=[{out}]",
            "data.image_size=256",
            "data.batch_size=1",
            "data.num_workers=0",
            "data.max_masks=100",
            "data.min_mask_area=0",
            "trainer.max_steps=-1",
            "trainer.max_epochs=1",  # one pass over the folder
            "module.warmup_steps=0",
            "module.lr=1e-3",
            "module.image_log_every=0",
            "logger=csv",
            "~callbacks.progress_bar",
            f"paths.root_dir={tmp_path}",
            "run_name=annotated",
        ],
        tmp_path,
    )
    assert "toy_3.png (no usable mask" in printed  # the empty image, skipped by name
    [results] = list(tmp_path.rglob("results.json"))
    metrics = json.loads(results.read_text())
    assert metrics["train_images_read"] == len(record_counts) == 3  # the three annotated images, the empty one skipped
    assert metrics["train_masks_read"] == sum(record_counts.values())
    [student] = list(tmp_path.rglob("checkpoints/student.safetensors"))
    before, after = load_file(STUDENT), load_file(student)
    assert any(not np.allclose(before[k].numpy(), after[k].numpy()) for k in before)
    # the annotator restarts on the new student (checkpoint=... model=tinyvit_toy), its proposals included
    tuned = load_model("tinyvit_toy", student)
    bundle = prepare(student, "tinyvit_toy", None, "browser", tmp_path / "cache")
    store = AnnotationStore(out.parent / "images", out)
    proposer = Proposer(tuned, {"stability_score_thresh": 0.5}, points_per_side=8)
    with AnnotateServer(bundle, store, proposer, port=0) as server:
        info = json.loads(request(server, "GET", "/model/info.json")[1])
        assert info["name"] == bundle.folder.name != "" and bundle.folder.name.startswith("tinyvit_toy-")
        status, body = request(server, "POST", "/api/propose/toy_3", b"{}")
        assert status == 200 and isinstance(json.loads(body)["objects"], list)
        assert json.loads(request(server, "GET", "/api/annotations/toy_0")[1])["objects"]  # the folder reopens


def test_two_tabs_conflict_in_the_page(browser, bundle, folder, tmp_path, toys):
    store = AnnotationStore(folder, tmp_path / "out")
    with AnnotateServer(bundle, store, None, port=0) as server:
        first, second = open_page(browser, server.url, (1400, 1100)), open_page(browser, server.url, (1400, 1100))
        for page, target in ((first, toys[0].instances[0]), (second, toys[0].instances[1])):
            open_image(page, "toy_0")
            click(page, *target.point)
        first.click("#save")
        first.evaluate("window.annotator.idle()")
        kept = store.read("toy_0")
        second.click("#save")
        second.evaluate("window.annotator.idle()")
        assert "changed since this page read it" in second.inner_text("#message")
        assert second.get_attribute("#message", "class") == "error"
        assert store.read("toy_0") == kept  # the stale save changed nothing
        second.click("#reload")  # asks before dropping the page's objects (the test accepts), then shows the saved file
        second.evaluate("window.annotator.idle()")
        assert second.evaluate("window.annotator.objects()") == first.evaluate("window.annotator.objects()")
        assert first.errors == second.errors == []
        first.close()
        second.close()
