"""The fronts: gRPC interceptor and HTTP (OpenAI/Cohere-shaped) front; each renders its own wire format."""
