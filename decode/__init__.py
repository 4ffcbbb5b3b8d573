"""Streaming VAE decode straight into the video file: causal chunks in time, blended tiles in space.

Public API (used by engine.runner and engine.redecode):
`to_vae_latents`, `stream_decode`, `StreamingDecode`, `DecodeStats`, `OomStep`, `DecodeCancelled`,
`DecodeOutOfMemory`, `decode_ladder`, `to_uint8_frames`, `VideoWriter`, `partial_path`, `write_json_atomic`, `remove_partials`.
"""
from decode.latents import to_vae_latents  # noqa: F401
from decode.stream import (  # noqa: F401
    MIN_TILE_PX,
    DecodeCancelled,
    DecodeOutOfMemory,
    DecodeStats,
    OomStep,
    StreamingDecode,
    decode_ladder,
    stream_decode,
    to_uint8_frames,
)
from decode.writer import VideoWriter, partial_path, remove_partials, write_json_atomic  # noqa: F401
