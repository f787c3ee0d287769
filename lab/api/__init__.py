"""The lab's demo shop: a real API (`app`) behind a real TLS terminator (`server`).

Nothing is imported here on purpose: uvicorn imports `lab.api.app` in the shop
process, which must not pull in the namespace machinery of `lab.api.server`.
"""
