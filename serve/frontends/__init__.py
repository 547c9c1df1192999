"""The protocol front-ends over the engine: shortfin/SGLang, OpenAI, Triton/KServe v2, ppl gRPC, Prometheus."""
