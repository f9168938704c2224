"""Fallbacks (§5): what a rejected or failed call gets instead of an error.

`base` holds the protocol and what the types share; `build` picks the type for a route;
`static`, `cache`, `queue` (+ `replay`) and `table` are the types; `log` writes fallback_logs.
"""
