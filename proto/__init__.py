"""The wire: the `.proto` contract, its generated code, and the transport both sides share.

`ps/` and `worker/` both stand on this package and never import each other.
"""
