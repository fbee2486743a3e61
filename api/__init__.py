"""Talking to a running ComfyUI from outside: an HTTP client and a local headless host.

Used by the main-job script, the batch renderer and the tests; nothing here runs inside
the host process.
"""
