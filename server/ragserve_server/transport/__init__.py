"""The fronts: gRPC (each method wrapped once, grpc_methods.py) and HTTP (OpenAI/Cohere-shaped); each renders its own wire format."""
