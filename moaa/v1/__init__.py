"""Generated from proto/moaa/v1 by tools/gen_proto.py; do not edit."""
