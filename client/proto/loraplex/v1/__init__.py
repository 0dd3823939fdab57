"""Generated protobuf and gRPC code of the `loraplex.v1` API (protos/loraplex/v1/*.proto).

Checked in and never edited by hand: regenerate with `python -m loraplex.client.protogen`;
tests/client/test_protogen.py fails when the checked-in code differs from a fresh generation.
"""
