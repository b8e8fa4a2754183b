"""Numerics with no model knowledge: fast-weight memory recurrences (recurrent + chunked).

Import from the submodule, ``from neuroplastic.ops.fast_weight import fast_weight``; the
package re-exports nothing, so that ``neuroplastic.ops.fast_weight`` stays the module
and is not shadowed by the function of the same name.
"""
