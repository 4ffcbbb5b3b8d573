"""VAE decode straight into the video file."""
from decode.latents import to_vae_latents  # noqa: F401
from decode.stream import DecodeStats, stream_decode, to_uint8_frames  # noqa: F401
from decode.writer import VideoWriter, partial_path, remove_partials, write_json_atomic  # noqa: F401
