"""ragserve gateway: gRPC Embed, Rerank and Generate in front of Triton Inference Server."""
