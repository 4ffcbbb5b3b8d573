"""One results format: the sidecar and the latents file, written and read in one place, and the gallery's reading."""
from __future__ import annotations

import dataclasses
import errno
import json
import os

import pytest
import torch

import decode
from configs.schema import DecodeSettings, GenerationRequest, Plan, RequestError
from engine.results import (
    LATENTS_FORMAT,
    SIDECAR_VERSION,
    PastResult,
    SavedLatents,
    Sidecar,
    find_result,
    gallery_items,
    list_results,
    read_result,
)

REQUEST = GenerationRequest(model="tiny-wan", task="t2v", prompt="a cat walks on the beach at sunset, slowly", frames=9,
                            height=32, width=32, fps=16, steps=2, guidance=5.0, seed=7)


def old_sidecar(video: str = "20261201-101010_t2v_7.mp4") -> dict:
    """A sidecar exactly as `runner.write_sidecar` wrote it before the format had a version."""
    plan = Plan(offload="none", decode=DecodeSettings(), predicted_peak_gpu_bytes=0, predicted_peak_host_bytes=123456,
                stages={"text": 1, "denoise": 2, "decode": 3}, reasons=("offload none: no CUDA GPU: running on the CPU",),
                summary="offload none, tiling on, peak RAM 1 MiB", device="cpu", budget_bytes=10**9, peak_stage="decode")
    return json.loads(json.dumps({
        "video": video,
        "latents": video.replace(".mp4", ".latents.pt"),
        "frames": 9,
        "request": REQUEST.to_dict(),
        "plan": plan.to_dict(),
        "timings": {"load_s": 0.5, "denoise_s": 1.25, "decode_s": 0.75, "total_s": 2.5},
        "predicted": {"peak_gpu_bytes": 0, "peak_host_bytes": 123456},
        "measured": {"peak_host_bytes": 2_000_000, "baseline_host_bytes": 1_000_000},
        "warnings": ["prompt has 40 tokens; the text encoder reads 16, so the rest is cut off"],
        "step_downs": [{"stage": "decoding", "error": "OutOfMemoryError: x", "change": "tiles 272x272 -> 136x136 px"}],
        "decode": {"frames": 9, "chunks": 3, "tiles": 1},
        "quant": None,
        "versions": {"torch": "2.13.0", "diffusers": "0.42.1"},
        "created": "2026-12-01T10:10:10",
    }))


def _write(folder, name: str, data: dict, video: bool = True):
    (folder / name).with_suffix(".json").write_text(json.dumps(data), encoding="utf-8")
    if video:
        (folder / name).write_bytes(b"an mp4")


# --------------------------------------------------------------------------- the sidecar


def test_an_old_sidecar_without_a_version_opens_in_the_gallery_with_every_key_as_it_was(tmp_path):
    data = old_sidecar()
    _write(tmp_path, data["video"], data)
    result = read_result(tmp_path / "20261201-101010_t2v_7.json")
    assert isinstance(result, PastResult)
    assert (result.name, result.video, result.sidecar) == (data["video"], tmp_path / data["video"],
                                                           tmp_path / "20261201-101010_t2v_7.json")
    for key, value in data.items():  # today's layout, value for value (JSON lists stay lists)
        assert json.loads(json.dumps(result.data[key])) == value, key
    assert result.data["version"] == 1 and result.data["kind"] == "generate"
    assert result.request == REQUEST  # "Reuse settings" reads the request back
    assert result.caption() == "T2V · seed 7 · a cat walks on the beach at sunset, slow…"  # 40 characters kept
    assert gallery_items([result]) == [(str(tmp_path / data["video"]), result.caption())]
    assert find_result(tmp_path, data["video"]).data == result.data


def test_an_old_redecode_sidecar_reads_as_a_decode(tmp_path):
    data = {  # what `app.py decode` wrote before the one format
        "video": "again.mp4", "latents": "/somewhere/run.latents.pt", "request": REQUEST.to_dict(),
        "decode_settings": dataclasses.asdict(DecodeSettings(chunk_frames=1)), "decode": {"frames": 9, "chunks": 3},
        "step_downs": [], "timings": {"vae_load_s": 0.1, "decode_s": 0.2}, "measured": {}, "created": "2026-12-01T10:10:10",
    }
    _write(tmp_path, "again.mp4", data)
    record = Sidecar.read(tmp_path / "again.json")
    assert (record.kind, record.version, record.frames, record.plan) == ("decode", 1, 9, None)
    assert record.decode_settings == DecodeSettings(chunk_frames=1) and record.request == REQUEST
    assert read_result(tmp_path / "again.json").data["decode_settings"]["chunk_frames"] == 1


def test_a_sidecar_round_trips_and_is_written_atomically(tmp_path):
    record = Sidecar.from_dict(old_sidecar("a.mp4"))
    path = record.write(tmp_path / "a.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]  # no temporary name left
    again = Sidecar.read(path)
    assert again == dataclasses.replace(record, version=SIDECAR_VERSION)
    assert again.plan.reasons == ("offload none: no CUDA GPU: running on the CPU",) and again.plan.decode == DecodeSettings()
    assert json.loads(path.read_text())["predicted"] == {"peak_gpu_bytes": 0, "peak_host_bytes": 123456}


@pytest.mark.parametrize("data, fragment", [
    ({"version": SIDECAR_VERSION + 1, "video": "a.mp4", "request": REQUEST.to_dict()}, "is not one this FitVideo reads"),
    ({"request": REQUEST.to_dict()}, "needs 'video'"),
    ({"video": "a.mp4", "request": {"prompt": "x"}}, "needs 'video'"),
    ([1, 2], "JSON object"),
])
def test_what_is_not_a_sidecar_is_named_and_left_out_of_the_gallery(tmp_path, data, fragment):
    with pytest.raises(ValueError, match=fragment):
        Sidecar.from_dict(data)
    _write(tmp_path, "a.mp4", data)
    assert read_result(tmp_path / "a.json") is None and list_results(tmp_path) == []


def test_the_gallery_lists_newest_first_and_skips_broken_or_orphaned_results(tmp_path):
    for i, name in enumerate(["old.mp4", "new.mp4", "gone.mp4"]):
        _write(tmp_path, name, old_sidecar(name), video=name != "gone.mp4")
        os.utime(tmp_path / name.replace(".mp4", ".json"), (1000 + i, 1000 + i))
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / ".hidden.partial.json").write_text(json.dumps(old_sidecar("old.mp4")))
    assert [r.name for r in list_results(tmp_path)] == ["new.mp4", "old.mp4"]
    assert [r.name for r in list_results(tmp_path, limit=1)] == ["new.mp4"]
    assert find_result(tmp_path, "../new.mp4") is None and find_result(tmp_path, "") is None
    assert list_results(tmp_path / "missing") == []


# --------------------------------------------------------------------------- the latents


def test_latents_round_trip_in_the_one_format(tmp_path):
    z = torch.randn(1, 16, 3, 4, 4)
    saved = SavedLatents(z, REQUEST).write(tmp_path / "run.latents.pt")
    assert saved.path == tmp_path / "run.latents.pt" and sorted(p.name for p in tmp_path.iterdir()) == ["run.latents.pt"]
    raw = torch.load(saved.path, weights_only=True)
    assert set(raw) == {"latents", "request", "format"} and raw["format"] == LATENTS_FORMAT == 1
    back = SavedLatents.read(saved.path)
    assert torch.equal(back.latents, z) and back.request == REQUEST


def test_a_failed_latents_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    def full_disk(obj, path):
        open(path, "wb").write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        SavedLatents(torch.zeros(1, 4, 1, 2, 2), REQUEST).write(tmp_path / "run.latents.pt")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content, fragment", [
    (None, "does not exist"),
    ({"something": 1}, "not a FitVideo latents file"),
    ({"latents": torch.zeros(1, 4, 1, 2, 2), "request": REQUEST.to_dict(), "format": 2}, "has format 2; this version reads 1"),
    ({"latents": torch.zeros(4, 2, 2), "request": REQUEST.to_dict(), "format": 1}, r"must be a \(B, C, F, H, W\) tensor, got \(4, 2, 2\)"),
])
def test_a_bad_latents_file_is_named_with_what_is_wrong(tmp_path, content, fragment):
    path = tmp_path / "x.latents.pt"
    if content is not None:
        torch.save(content, path)
    with pytest.raises(RequestError, match=fragment):
        SavedLatents.read(path)
    path.write_bytes(b"not a torch file")
    with pytest.raises(RequestError, match="is not readable"):
        SavedLatents.read(path)


# --------------------------------------------------------------------------- one writer for the runner and app.py decode


def test_a_run_and_its_redecode_write_the_same_format_and_both_open_in_the_gallery(runner, tmp_path):
    from engine.redecode import redecode

    out = runner.outputs_dir / "run.mp4"
    result = runner.generate(REQUEST, out_path=out)
    again = redecode(result.latents_path, runner.outputs_dir / "again.mp4", {"chunk_frames": 1},
                     vae={"dtype": "float32", "device": "cpu"})
    run_record, decode_record = Sidecar.read(result.sidecar_path), Sidecar.read(again.sidecar_path)
    assert (run_record.kind, decode_record.kind) == ("generate", "decode")
    assert run_record.version == decode_record.version == SIDECAR_VERSION
    assert run_record.request == decode_record.request == result.request
    assert run_record.latents == "run.latents.pt" and decode_record.latents == str(result.latents_path)
    assert decode_record.decode_settings == dataclasses.replace(result.request.decode, chunk_frames=1)
    assert run_record.frames == decode_record.frames == 9 and run_record.plan == result.plan
    assert set(json.loads(again.sidecar_path.read_text())) == set(json.loads(result.sidecar_path.read_text()))
    assert sorted(r.name for r in list_results(runner.outputs_dir)) == ["again.mp4", "run.mp4"]
    assert not list(runner.outputs_dir.glob(f"*{decode.writer.PARTIAL_TAG}*"))
