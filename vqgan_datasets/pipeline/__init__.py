"""From any image input to tokens on every local device: images, worker processes, the engine."""
