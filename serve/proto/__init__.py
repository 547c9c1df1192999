"""ppl.llm.serving's gRPC API: llm.proto, and its Python stubs (llm_pb2, llm_pb2_grpc) generated from it
when the package is built or installed (setup.py's build_grpc step; they are not in git)."""
