"""The one gRPC client package: every caller of the gateway and the annotator (the CLI, the pipeline,
the gateway's own calls to the annotator) goes through it.

    endpoint.py   address, TLS, bearer token -> channel and call metadata
    errors.py     the one mapping from a gRPC status to UserError / TransientError
    window.py     the windowed driver of the bidirectional streams (GenerateBatch, AnnotateStream)
    generate.py   `moaa generate`: a GenerateStream rendered to a terminal
    pairs.py      samples -> AnnotateRequest -> preference rows: the one row schema
    annotate.py   `moaa annotate` (a samples file -> a pairs file, resumable) and one Annotate call
    judge_eval.py `moaa judge-eval`: agreement of the ensemble and each judge with human labels
"""
