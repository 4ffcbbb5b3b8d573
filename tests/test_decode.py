"""Streaming decode: causal chunks, tiles, exact sizes, the mp4 sink, out-of-memory step-down, `app.py decode`.

Reference for every comparison: diffusers' own untiled `vae.decode` (clamped to [-1, 1], as the pipelines'
post-processing does). Tiny VAEs (the configs of engine/tiny.py) cover most cases; the full-size
CogVideoX-2b and Wan 2.1 VAEs, with random weights in float32, run at small latents only.
"""
from __future__ import annotations

import json
import math
import threading

import numpy as np
import pytest
import torch

import decode
from configs.schema import DecodeSettings
from decode.causal import causal_decoder
from vram_utils.tiles import axis_tiles, blend_weight, plan_tiles
from tests.conftest import read_video, video_fps

UNTILED = DecodeSettings(enable_vae_tiling=False)


# --------------------------------------------------------------------------- helpers and VAEs


def tiny_cogvideox():
    from diffusers import AutoencoderKLCogVideoX

    torch.manual_seed(0)
    return AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4,
    ).eval()


def tiny_wan():
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    return AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    ).eval()


@pytest.fixture(scope="module")
def tiny():
    return {"cogvideox": tiny_cogvideox(), "wan": tiny_wan()}


@pytest.fixture(scope="module")
def full():
    """Full-size VAEs (diffusers' defaults: CogVideoX-2b, Wan 2.1), random weights, float32."""
    from diffusers import AutoencoderKLCogVideoX, AutoencoderKLWan

    torch.manual_seed(0)
    return {"cogvideox": AutoencoderKLCogVideoX().eval(), "wan": AutoencoderKLWan().eval()}


def latents(vae, frames: int, h: int, w: int, seed: int = 1) -> torch.Tensor:
    c = vae.config.latent_channels if hasattr(vae.config, "latent_channels") else vae.config.z_dim
    return torch.randn(1, c, frames, h, w, generator=torch.Generator().manual_seed(seed))  # (B, C, F, h, w)


def reference(vae, z: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return vae.decode(z).sample.clamp(-1, 1)  # (B, C, T, H, W)


def ours(vae, z: torch.Tensor, settings: DecodeSettings = UNTILED) -> tuple[torch.Tensor, list[int], decode.DecodeStats]:
    """Our decode gathered into one tensor (fine for tests), the frames of each chunk, and the stats."""
    run = decode.StreamingDecode(vae, z, settings)
    chunks = list(run.chunks(lambda video: video.cpu()))
    return torch.cat(chunks, dim=2), [c.shape[2] for c in chunks], run.stats()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two videos in [-1, 1], over the [0, 1] range."""
    mse = ((a.float() - b.float()) / 2).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


class ListSink:
    def __init__(self):
        self.writes: list[np.ndarray] = []

    def write(self, frames: np.ndarray) -> None:
        self.writes.append(frames)


# --------------------------------------------------------------------------- tiles (pure)


@pytest.mark.parametrize("length", [1, 5, 30, 45, 60, 90])
@pytest.mark.parametrize("tile,stride", [(34, 18), (34, 16), (15, 12), (8, 8), (8, 1), (4, 3), (200, 100)])
def test_tiles_cover_the_axis_with_equal_tiles_and_no_step_beyond_stride(length, tile, stride):
    size, starts = axis_tiles(length, tile, stride)
    n = len(starts)
    assert size <= min(tile, length)
    assert starts[0] == 0 and starts[-1] + size == length  # first at 0, last flush with the end
    # no gaps, and every overlap at least tile - stride wide (so never a step beyond the stride)
    assert all(0 < b - a <= size - (tile - stride) <= stride for a, b in zip(starts, starts[1:]))
    assert n == (1 if tile >= length else math.ceil((length - tile) / stride) + 1)
    if n > 1:  # the smallest such tile: one pixel less could not keep that overlap with n tiles
        assert n * (size - 1) < length + (n - 1) * (tile - stride)


def test_tiles_shrink_to_what_the_overlap_needs():
    # Wan at 240x360 with diffusers' default 256 px tiles, stride 192 (latent 32 / 24): two 27-latent tiles
    # (216 px, overlap 72 px) instead of two of 256 px overlapping by 152.
    layout = plan_tiles(30, 45, 8, (256, 256), (192, 192))
    assert (layout.tile_h, layout.tile_w, layout.ys, layout.xs) == (30, 27, (0,), (0, 18))


def test_blend_weights_sum_to_one_across_every_seam():
    layout = plan_tiles(30, 45, 8, (144, 200), (120, 160))
    assert (len(layout.ys), len(layout.xs)) == (2, 2)
    th, tw = layout.tile_h * 8, layout.tile_w * 8  # 136 x 200: shrunk to keep the 24 px overlap
    assert (th, tw) == (136, 200)
    total = torch.zeros(240, 360)
    for y0, x0 in layout.tiles():
        w = blend_weight(layout, y0, x0)
        assert w.shape == (th, tw) and w.min() > 0
        total[y0 * 8 : y0 * 8 + th, x0 * 8 : x0 * 8 + tw] += w
    # Two tiles per axis with linear complementary ramps: the raw weights already add to exactly 1.
    assert torch.allclose(total, torch.ones(240, 360), atol=1e-6)


# --------------------------------------------------------------------------- time: chunks and causal caches


@pytest.mark.parametrize("family", ["cogvideox", "wan"])
def test_frame_count_equals_diffusers_for_every_length_and_chunking(tiny, family):
    vae = tiny[family]
    for frames in (1, 2, 3, 4, 5, 6, 9):
        z = latents(vae, frames, 2, 2)
        expected = reference(vae, z).shape[2]
        for chunk_frames in (0, 1, 2, 3):
            video, per_chunk, stats = ours(vae, z, DecodeSettings(enable_vae_tiling=False, chunk_frames=chunk_frames))
            assert video.shape[2] == stats.frames == sum(per_chunk) == expected, (frames, chunk_frames, per_chunk)
            assert causal_decoder(vae).total_frames(frames, chunk_frames) == expected
            assert 0 not in per_chunk


@pytest.mark.parametrize("family", ["cogvideox", "wan"])
def test_own_chunks_untiled_match_diffusers_within_1e_3(tiny, family):
    vae = tiny[family]
    for frames in (1, 4, 7):
        z = latents(vae, frames, 4, 6)
        ref = reference(vae, z)
        video, _, _ = ours(vae, z)
        assert video.shape == ref.shape
        assert (video - ref).abs().max().item() <= 1e-3


def test_wan_any_chunking_matches_diffusers_within_1e_3(tiny):
    # Wan's norms are per pixel and its attention per frame: chunking in time must not change a thing.
    vae = tiny["wan"]
    z = latents(vae, 7, 4, 6)
    ref = reference(vae, z)
    for chunk_frames in (2, 3, 6):
        video, per_chunk, _ = ours(vae, z, DecodeSettings(enable_vae_tiling=False, chunk_frames=chunk_frames))
        assert per_chunk[0] == 1 and (video - ref).abs().max().item() <= 1e-3


@pytest.mark.parametrize("family", ["cogvideox", "wan"])
def test_full_size_own_chunks_match_diffusers_within_1e_3(full, family):
    vae = full[family]
    z = latents(vae, 3, 4, 6)
    ref = reference(vae, z)
    video, per_chunk, stats = ours(vae, z)
    assert video.shape == ref.shape == (1, 3, 9, 32, 48)
    assert (video - ref).abs().max().item() <= 1e-3
    # diffusers decodes CogVideoX's 3 latent frames in one batch; Wan one latent frame at a time.
    assert per_chunk == ([9] if family == "cogvideox" else [1, 4, 4])


def test_full_size_cogvideox_frame_by_frame_keeps_psnr_35(full):
    vae = full["cogvideox"]
    z = latents(vae, 3, 8, 12)
    ref = reference(vae, z)
    video, per_chunk, stats = ours(vae, z, DecodeSettings(enable_vae_tiling=False, chunk_frames=1))
    assert per_chunk == [1, 4, 4] and stats.frame_by_frame
    # GroupNorm spans the frames of a chunk, so single frames change the numbers (the test would be moot
    # if they did not), but not by much.
    assert (video - ref).abs().max().item() > 1e-3
    assert psnr(video, ref) >= 35


@pytest.mark.parametrize("family", ["cogvideox", "wan"])
def test_chunk_boundaries_carry_the_causal_cache(tiny, family):
    """Seed 000's two bugs: a chunk that yields 0 (or 1) frames, and a cache reset at every chunk."""
    vae = tiny[family]
    z = latents(vae, 5, 4, 6)
    ref = reference(vae, z)
    settings = DecodeSettings(enable_vae_tiling=False, chunk_frames=1 if family == "wan" else 2)
    video, per_chunk, _ = ours(vae, z, settings)
    # Every later chunk yields 4 frames per latent frame; each boundary frame equals diffusers'.
    assert per_chunk == ([1, 4, 4, 4, 4] if family == "wan" else [9, 8])
    assert (video - ref).abs().max().item() <= 1e-3

    # The reset-cache bug, built from the same parts: a fresh state per chunk. Frames right after each
    # boundary then differ clearly from diffusers', so the check above is a real one.
    dec = causal_decoder(vae)
    pieces = []
    for a, b in dec.chunk_bounds(5, settings.chunk_frames):
        with torch.inference_mode():
            pieces += list(dec.decode(z[:, :, a:b], dec.new_state(), a, 5))
    reset = torch.cat(pieces, dim=2).clamp(-1, 1)
    if family == "wan":
        # Wan's temporal upsamplers take an empty cache for the video's start: every chunk yields 1 frame.
        assert reset.shape[2] == 5 != ref.shape[2] == 17
        return
    assert reset.shape == ref.shape
    first_after_boundary = per_chunk[0]
    assert (reset[:, :, first_after_boundary] - ref[:, :, first_after_boundary]).abs().max().item() > 0.01


def test_one_frame_chunks_need_our_cogvideox_upsampler(tiny):
    # diffusers' CogVideoXUpsample3D never doubles a 1-frame input in time, so decoding one latent frame at a
    # time with its shared conv_cache gives 1 frame per latent frame instead of 4 (seed 000's missing frames).
    vae = tiny["cogvideox"]
    z = latents(vae, 3, 4, 6)
    cache, naive = None, []
    with torch.inference_mode():
        for i in range(3):
            out, cache = vae.decoder(z[:, :, i : i + 1], conv_cache=cache)
            naive.append(out.shape[2])
    assert naive == [1, 1, 1]
    _, per_chunk, _ = ours(vae, z, DecodeSettings(enable_vae_tiling=False, chunk_frames=1))
    assert per_chunk == [1, 4, 4]


# --------------------------------------------------------------------------- space: tiles and sizes


@pytest.mark.parametrize(
    "tile,stride",
    [
        ((120, 180), (96, 136)),  # diffusers' CogVideoX gives 248x376 here
        ((96, 96), (80, 72)),  # and 240x380 here
        ((272, 272), (128, 144)),  # the defaults (seed 002)
        ((100, 50), (60, 36)),  # not multiples of 8
        ((33, 40), (32, 33)),  # tiny tiles
        ((512, 512), (256, 256)),  # larger than the frame
    ],
)
@pytest.mark.parametrize("family", ["cogvideox", "wan"])
def test_any_tiling_gives_exactly_latent_size_times_factor(tiny, family, tile, stride):
    vae = tiny[family]
    z = latents(vae, 1, 30, 45)
    settings = DecodeSettings(tile_y=tile[0], tile_x=tile[1], tile_stride_y=stride[0], tile_stride_x=stride[1])
    video, _, stats = ours(vae, z, settings)
    assert video.shape == (1, 3, 1, 240, 360)
    assert (stats.height, stats.width) == (240, 360)


def test_diffusers_cogvideox_tiling_returns_wrong_sizes_ours_does_not(tiny):
    """The sizes NOTES.md reports for diffusers 0.42.1, next to ours with the same tiles and strides."""
    vae = tiny["cogvideox"]
    z = latents(vae, 1, 30, 45)
    for tile, expected_wrong, stride in (((120, 180), (248, 376), (96, 136)), ((96, 96), (240, 380), (80, 72))):
        vae.enable_tiling(tile_sample_min_height=tile[0], tile_sample_min_width=tile[1])
        try:
            assert tuple(reference(vae, z).shape[-2:]) == expected_wrong
        finally:
            vae.disable_tiling()
        settings = DecodeSettings(tile_y=tile[0], tile_x=tile[1], tile_stride_y=stride[0], tile_stride_x=stride[1])
        video, _, stats = ours(vae, z, settings)
        assert tuple(video.shape[-2:]) == (240, 360) and stats.tiles > 1


@pytest.mark.parametrize("family", ["cogvideox", "wan"])
def test_full_size_tiles_keep_psnr_35(full, family):
    vae = full[family]
    z = latents(vae, 2, 12, 16)
    ref = reference(vae, z)
    if family == "cogvideox":
        settings, tiles = DecodeSettings(tile_y=64, tile_x=64, tile_stride_y=32, tile_stride_x=32), 2 * 3
    else:
        # The random-weight Wan VAE sees far: 64 px tiles give 27.6 dB (diffusers' own tiling 26.5 dB at
        # 64/32), 96 px tiles 37.7 dB. One seam across the frame.
        settings, tiles = DecodeSettings(tile_y=96, tile_x=96, tile_stride_y=48, tile_stride_x=48), 1 * 2
    video, _, stats = ours(vae, z, settings)
    assert stats.tiles == tiles and video.shape == ref.shape
    assert psnr(video, ref) >= 35


@pytest.mark.parametrize("family", ["cogvideox", "wan"])
def test_tiny_tiles_with_chunks_keep_psnr_35(tiny, family):
    vae = tiny[family]
    z = latents(vae, 3, 24, 32)
    ref = reference(vae, z)
    settings = DecodeSettings(tile_y=144, tile_x=160, tile_stride_y=48, tile_stride_x=96, chunk_frames=1)
    video, per_chunk, stats = ours(vae, z, settings)
    assert stats.tiles == 2 * 2 and per_chunk == [1, 4, 4]
    assert psnr(video, ref) >= 35


# --------------------------------------------------------------------------- streaming into the sink


def test_each_chunk_reaches_the_sink_before_the_next_is_decoded(tiny):
    vae = tiny["wan"]
    calls = []
    handle = vae.decoder.conv_in.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[2]))
    sink, seen = ListSink(), []
    try:
        settings = DecodeSettings(tile_y=32, tile_x=32, tile_stride_y=16, tile_stride_x=16)
        stats = decode.stream_decode(
            vae, latents(vae, 4, 6, 6), settings, sink, on_chunk=lambda j, m: seen.append((j, m, len(calls)))
        )
    finally:
        handle.remove()
    tiles = stats.tiles
    assert tiles == 4
    # After chunk j, conv_in has run exactly j chunks x tiles times: nothing is decoded ahead of the sink.
    assert seen == [(j, 4, j * tiles) for j in (1, 2, 3, 4)]
    assert [w.shape for w in sink.writes] == [(1, 48, 48, 3)] + [(4, 48, 48, 3)] * 3
    assert all(w.dtype == np.uint8 for w in sink.writes) and stats.frames == 13


def test_stream_decode_writes_the_mp4_and_nothing_else(tiny, tmp_path):
    vae = tiny["cogvideox"]
    z = latents(vae, 3, 4, 4)
    out = tmp_path / "video.mp4"
    progress = []
    with decode.VideoWriter(out, fps=8) as writer:
        stats = decode.stream_decode(vae, z, DecodeSettings(chunk_frames=1), writer, on_chunk=lambda j, m: progress.append((j, m)))
    frames = read_video(out)
    assert frames.shape == (9, 32, 32, 3) and stats.frames == 9
    assert video_fps(out) == 8
    assert progress == [(1, 3), (2, 3), (3, 3)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["video.mp4"]  # the partial name is gone
    # The encoded frames are the decoded ones, in order: each file frame is closest to its own decoded
    # frame. (Random-weight output is colour noise, which H.264's 4:2:0 chroma keeps only to ~25 dB.)
    expected = decode.to_uint8_frames(ours(vae, z, DecodeSettings(chunk_frames=1))[0]).numpy().astype(np.float32)
    mse = ((frames.astype(np.float32)[:, None] - expected[None]) ** 2).mean(axis=(2, 3, 4))  # (file, decoded)
    assert list(mse.argmin(axis=1)) == list(range(9))
    assert 10 * math.log10(255**2 / mse.diagonal().mean()) >= 22
    json.dumps(stats.to_dict())  # the sidecar can hold it


class Stop(Exception):
    pass


def test_cancel_from_on_chunk_or_stop_leaves_no_file(tiny, tmp_path):
    vae = tiny["wan"]
    z = latents(vae, 3, 4, 4)

    def cancel(j, m):
        if j == 2:
            raise Stop("stop pressed")

    out = tmp_path / "a.mp4"
    with pytest.raises(Stop):
        with decode.VideoWriter(out, fps=16) as writer:
            decode.stream_decode(vae, z, UNTILED, writer, on_chunk=cancel)
    stop = threading.Event()
    stop.set()
    with pytest.raises(decode.DecodeCancelled):
        with decode.VideoWriter(tmp_path / "b.mp4", fps=16) as writer:
            decode.stream_decode(vae, z, UNTILED, writer, stop=stop)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- out of memory


def _oom_when_wider_than(vae, max_w: int, from_call: int):
    """conv_in raises torch.OutOfMemoryError for latent tiles wider than max_w, from its from_call-th call on."""
    calls = [0]

    def hook(module, args):
        calls[0] += 1
        if calls[0] >= from_call and args[0].shape[-1] > max_w:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")

    return vae.decoder.conv_in.register_forward_pre_hook(hook)


def test_out_of_memory_halves_the_tile_replays_and_retries_the_chunk(tiny):
    vae = tiny["wan"]
    z = latents(vae, 4, 16, 16)
    handle = _oom_when_wider_than(vae, 8, from_call=3)  # chunks 0 and 1 fit untiled, chunk 2 does not
    try:
        video, per_chunk, stats = ours(vae, z, UNTILED)
    finally:
        handle.remove()
    assert per_chunk == [1, 4, 4, 4]
    (step,) = stats.oom_steps
    assert (step.chunk, step.tile_from_px, step.tile_to_px, step.replayed_chunks) == (2, (128, 128), (64, 64), 2)
    # 64 px tiles at most, stride 48: three per axis over 128 px, shrunk to 56 px (overlap 16 px kept)
    assert "out of memory" in step.error and stats.tile_px == (56, 56) and stats.tiles == 9
    # Chunks before the failure are the untiled decode; from the failure on, exactly what 64 px tiles
    # decode from the start (the replay rebuilt every tile's causal cache).
    untiled, _, _ = ours(vae, z, UNTILED)
    tiled, _, _ = ours(vae, z, DecodeSettings(tile_y=64, tile_x=64, tile_stride_y=step.stride_to_px[0], tile_stride_x=step.stride_to_px[1]))
    assert (video[:, :, :5] - untiled[:, :, :5]).abs().max().item() <= 1e-5
    assert (video[:, :, 5:] - tiled[:, :, 5:]).abs().max().item() <= 1e-5


def test_out_of_memory_at_the_tile_floor_splits_the_chunks_to_one_latent_frame(tiny):
    vae = tiny["cogvideox"]
    z = latents(vae, 3, 12, 16)  # diffusers' own chunking: one chunk of all 3 latent frames
    calls = []

    def hook(module, args):  # any chunk of more than one latent frame runs out of memory
        calls.append(args[0].shape[2])
        if args[0].shape[2] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")

    handle = vae.decoder.conv_in.register_forward_pre_hook(hook)
    try:
        video, per_chunk, stats = ours(vae, z, UNTILED)
    finally:
        handle.remove()
    halve, split = stats.oom_steps
    assert (halve.action, halve.tile_from_px, halve.tile_to_px) == ("halve tiles", (96, 128), (64, 64))
    assert (split.action, split.chunk, split.tile_to_px) == ("one latent frame per chunk", 0, (64, 64))
    assert per_chunk == [1, 4, 4] and stats.chunk_frames == 1 and stats.frame_by_frame and stats.frames == 9
    # The result is exactly what those settings decode from the start.
    expected, _, _ = ours(vae, z, DecodeSettings(tile_y=64, tile_x=64, tile_stride_y=split.stride_to_px[0],
                                                 tile_stride_x=split.stride_to_px[1], chunk_frames=1))
    assert (video - expected).abs().max().item() <= 1e-5


def test_out_of_memory_at_the_floor_raises_an_oom_naming_the_steps(tiny):
    vae = tiny["wan"]
    handle = _oom_when_wider_than(vae, 0, from_call=1)  # nothing fits
    try:
        with pytest.raises(decode.DecodeOutOfMemory, match="even with 64x64 px tiles") as info:
            ours(vae, latents(vae, 2, 32, 32), DecodeSettings(tile_y=256, tile_x=256, tile_stride_y=192, tile_stride_x=192))
    finally:
        handle.remove()
    assert isinstance(info.value, torch.OutOfMemoryError)  # the runner's OOM handling still sees an OOM
    assert "2 step(s) down" in str(info.value)  # 256 -> 128 -> 64


def test_at_the_bottom_the_decode_says_where_it_ended_so_no_caller_tries_those_rungs_again(tiny):
    vae = tiny["cogvideox"]
    handle = _oom_when_wider_than(vae, 0, from_call=1)  # nothing fits
    try:
        with pytest.raises(decode.DecodeOutOfMemory) as info:
            ours(vae, latents(vae, 3, 16, 16), DecodeSettings(enable_vae_tiling=False))
    finally:
        handle.remove()
    # untiled 128 px -> 64 px tiles (the floor) -> CogVideoX's own 2-latent-frame chunks halved to 1
    assert [(s.action, s.tile_to_px) for s in info.value.steps] == [
        ("halve tiles", (64, 64)), ("one latent frame per chunk", (64, 64)),
    ]
    ended = info.value.settings
    assert (ended.enable_vae_tiling, ended.tile_y, ended.tile_x, ended.chunk_frames) == (True, 64, 64, 1)
    assert decode.decode_ladder(vae, (128, 128)).next_decode(ended) is None  # nothing left below it


def test_without_its_own_rungs_the_decode_raises_the_first_out_of_memory_as_it_is(tiny):
    vae = tiny["wan"]
    handle = _oom_when_wider_than(vae, 0, from_call=1)
    run = decode.StreamingDecode(vae, latents(vae, 2, 16, 16), UNTILED, step_down=False)
    try:
        with pytest.raises(torch.OutOfMemoryError, match="simulated") as info:
            list(run.chunks(lambda video: video.cpu()))
    finally:
        handle.remove()
    assert not isinstance(info.value, decode.DecodeOutOfMemory)
    assert run.oom_steps == [] and run.position == UNTILED  # the caller steps from here


# --------------------------------------------------------------------------- app.py decode


def _save_run(tmp_path, tiny_models, z: torch.Tensor, **request) -> "Path":
    from configs.schema import GenerationRequest

    req = GenerationRequest(model="tiny-cogvideox", task="t2v", prompt="a cat", frames=9, height=32, width=32, fps=8, **request)
    path = tmp_path / "run.latents.pt"
    torch.save({"latents": z, "request": req.to_dict(), "format": 1}, path)
    return path


def test_app_decode_reruns_only_the_decode_with_new_settings(tiny_models, tmp_path):
    from ui import cli
    from engine.redecode import load_vae

    vae = load_vae("tiny-cogvideox", "t2v", dtype="float32", device="cpu")
    z = latents(vae, 3, 4, 4)
    lat = _save_run(tmp_path, tiny_models, z, decode=DecodeSettings(tile_x=64, tile_y=64, tile_stride_x=48, tile_stride_y=32))
    out = tmp_path / "again.mp4"
    assert cli.main(["decode", "--latents", str(lat), "--out", str(out), "--chunk-frames", "1", "--dtype", "float32", "--device", "cpu"]) == 0
    frames = read_video(out)
    assert frames.shape == (9, 32, 32, 3) and video_fps(out) == 8
    sidecar = json.loads(out.with_suffix(".json").read_text())
    # The flag given wins; the rest comes from the run's own settings.
    assert sidecar["decode_settings"] == {
        "enable_vae_tiling": True, "tile_x": 64, "tile_y": 64, "tile_stride_x": 48, "tile_stride_y": 32, "chunk_frames": 1,
        "fixed_tiles": False,  # no tile flag given: the run's (not the defaults, so its own anyway)
    }
    assert sidecar["decode"]["frames"] == 9 and sidecar["decode"]["chunks"] == 3
    assert sidecar["timings"]["decode_s"] > 0


def test_app_decode_bad_input_exits_2_naming_the_problem(tiny_models, tmp_path, capsys):
    from ui import cli

    missing = tmp_path / "nope.latents.pt"
    assert cli.main(["decode", "--latents", str(missing), "--out", str(tmp_path / "x.mp4")]) == 2
    assert "does not exist" in capsys.readouterr().err
    junk = tmp_path / "junk.pt"
    torch.save({"something": 1}, junk)
    assert cli.main(["decode", "--latents", str(junk), "--out", str(tmp_path / "x.mp4")]) == 2
    assert "not a FitVideo latents file" in capsys.readouterr().err
    lat = _save_run(tmp_path, tiny_models, torch.zeros(1, 4, 3, 4, 4))
    assert cli.main(["decode", "--latents", str(lat), "--out", str(tmp_path / "x.mp4"), "--tile-x", "64", "--tile-stride-x", "128"]) == 2
    assert "would leave gaps" in capsys.readouterr().err
    assert not (tmp_path / "x.mp4").exists()
