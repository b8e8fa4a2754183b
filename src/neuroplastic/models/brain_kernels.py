"""Compiled (numba) CPU kernels of the brain's per-token cycle and its eligibility pass.

These are the fast CPU forms of :meth:`neuroplastic.models.brain.Brain._cycle_torch`
and :meth:`~neuroplastic.models.brain.Brain._eligibility_torch`, which are the readable
references (and the path used on CUDA or where numba is not installed); the tests check
that both give the same activity and the same weight changes.

The work is event-driven: only synapses of *active* presynaptic neurons are visited, and
only neurons that received input this token are candidates of a module's k-winners-take-all,
so a token costs about ``sum over projections of k_src * fan_out`` synaptic events (about
12,000 for the full 79,872-neuron brain) instead of one pass over every neuron. Streams are
independent and run in parallel (``prange``); each keeps its scratch arrays (input
accumulators with a "stamp" that says which token wrote them, so nothing is cleared
between tokens) for all its tokens, which keeps them in the core's cache.

Layout (shared with the torch path, see :mod:`neuroplastic.models.brain`):

* neurons of module ``m`` are ``0 .. N[m]-1``; a flat neuron space puts module ``m`` at
  ``noff[m]``;
* one token's activity is a row of ``Ktot = sum(k)`` slots, module ``m`` at
  ``koff[m] .. koff[m] + k[m]``: neuron index (``-1`` = empty slot) and value;
* synapses of projection ``p`` are ``off[p] + j * F[p] + f`` for source neuron ``j`` and
  its ``f``-th outgoing synapse: target ``syn_tgt`` and weight ``syn_w`` (fan-out layout;
  every target has the same fan-in by construction).

Importing this module needs numba; :data:`AVAILABLE` says whether it is there.
"""

from __future__ import annotations

import math

import numpy as np

try:  # numba is optional: the torch path computes the same thing, only slower on CPU
    import numba
    from numba import njit, prange

    AVAILABLE = True
except ImportError:  # pragma: no cover - exercised only without numba
    numba = None
    AVAILABLE = False

    def njit(*args, **kwargs):
        def wrap(f):
            return f

        return wrap if not (args and callable(args[0])) else args[0]

    prange = range

# module numbers (REC is the hippocampal recall, a pattern in the thalamic code space)
THAL, WERN, PFC, HIP, BG, BROCA, REC = 0, 1, 2, 3, 4, 5, 6
NMOD = 7
# projection table columns
P_SRC, P_TGT, P_OFF, P_F, P_DELAY, P_KIND, P_STRIDE = 0, 1, 2, 3, 4, 5, 6
# flags
F_THAL_GATING, F_HIPPOCAMPUS, F_WORKING_MEMORY, F_BG_GATING, F_LIF = 0, 1, 2, 3, 4
# float params
FP_GATE_GAIN, FP_GATE_BIAS, FP_RECALL_THR, FP_BG_FLOOR, FP_RATE_SCALE = 0, 1, 2, 3, 4


@njit(cache=True, nogil=True)
def _kth_largest(a, n, k):
    """The k-th largest of a[:n] (1 <= k <= n), rearranging a[:n] (quickselect)."""
    lo, hi = 0, n - 1
    target = k - 1  # index in descending order
    while True:
        if lo == hi:
            return a[lo]
        mid = (lo + hi) >> 1
        # median of three as pivot
        x, y, z = a[lo], a[mid], a[hi]
        if x < y:
            x, y = y, x
        if y < z:
            y, z = z, y
            if x < y:
                x, y = y, x
        pivot = y
        i, j = lo, hi
        while i <= j:
            while a[i] > pivot:
                i += 1
            while a[j] < pivot:
                j -= 1
            if i <= j:
                a[i], a[j] = a[j], a[i]
                i += 1
                j -= 1
        if target <= j:
            hi = j
        elif target >= i:
            lo = i
        else:
            return a[target]


@njit(cache=True, nogil=True)
def _select_topk(score, sel, n, k, tmp, tsel, row_idx, row_val, base):
    """Write the k largest of score[:n] (neuron sel[i]) to the row, in candidate order; ties
    at the k-th value go to the earliest candidates. Returns the number written (k <= n).

    Long lists (n >= 256, k <= n / 2) are thinned first: a strided sample of 128 scores
    gives a threshold that about 1.5 k scores pass; one branch-free pass collects those (in order) and only they
    are quickselected (when the sample guessed too high, all n are)."""
    m = 0
    if n >= 256 and n >= 2 * k:
        s = 128
        stride = n // s
        for i in range(s):
            tmp[i] = score[i * stride]
        r = (k * s) // n
        r = r + r // 2 + 2
        if r > s:
            r = s
        tau = _kth_largest(tmp, s, r)
        for i in range(n):
            v = score[i]
            tmp[m] = v
            tsel[m] = sel[i]
            m += v >= tau
    if m < k:  # no thinning (or it kept too few): all candidates
        for i in range(n):
            tmp[i] = score[i]
            tsel[i] = sel[i]
        m = n
    # tmp/tsel now hold m >= k candidates in order; quickselect needs a scratch copy
    for i in range(m):
        score[i] = tmp[i]
    kth = _kth_largest(tmp, m, k)
    n_above = 0
    for i in range(m):
        n_above += score[i] > kth
    ties = k - n_above
    nw = 0
    for i in range(m):
        v = score[i]
        if v > kth or (v == kth and ties > 0):
            if v == kth:
                ties -= 1
            row_idx[base + nw] = tsel[i]
            row_val[base + nw] = v
            nw += 1
    return nw


@njit(cache=True, nogil=True)
def _hash_add(hkeys, hacc, mask, n, w, cand, nc):
    """acc[n] += w in an open-addressing table (linear probing); a new key is appended
    to cand (its slot), so cand lists the candidates in the order they first got input."""
    h = (n * 2654435761) & mask
    while True:
        key = hkeys[h]
        if key == n:
            hacc[h] += w
            return nc
        if key < 0:
            hkeys[h] = n
            hacc[h] = w
            cand[nc] = h
            return nc + 1
        h = (h + 1) & mask


@njit(cache=True, nogil=True)
def _hash_get(hkeys, hacc, mask, n):
    h = (n * 2654435761) & mask
    while True:
        key = hkeys[h]
        if key == n:
            return hacc[h]
        if key < 0:
            return np.float32(0.0)
        h = (h + 1) & mask


@njit(cache=True, nogil=True)
def _hash_clear(hkeys, cand, nc):
    for i in range(nc):
        hkeys[cand[i]] = -1


@njit(cache=True, nogil=True)
def _accumulate(p, proj, pre_idx, pre_val, koff, kmod, syn, hkeys, hacc, mask, cand, nc):
    """Add the input of projection p from the active sources in pre_* (one token's row);
    returns the new candidate count."""
    src = proj[p, P_SRC]
    off = proj[p, P_OFF]
    fan = proj[p, P_F]
    stride = proj[p, P_STRIDE]
    base = koff[src]
    for i in range(kmod[src]):
        j = pre_idx[base + i]
        if j < 0:
            continue
        v = pre_val[base + i]
        if v == 0.0:
            continue
        s0 = off + j * stride
        for f in range(fan):
            nc = _hash_add(hkeys, hacc, mask, np.int64(syn[s0 + f, 0]), syn[s0 + f, 1] * v, cand, nc)
    return nc


@njit(cache=True, nogil=True)
def _finalize(m, nc, cand, hkeys, hacc, mask, koff, kmod, prev_idx, state_v, state_tl, soff,
              decay, thr, lif, rate_scale, gated, gkeys, gacc, gmask, bg_floor, tick, score,
              sel, tmp, tsel, row_idx, row_val):
    """k-winners-take-all of module m among its candidates; writes the row slots of m and
    empties the table."""
    stateful = soff >= 0
    if stateful and not lif:
        # working memory: the previous winners stay candidates with their decayed potential
        base = koff[m]
        for i in range(kmod[m]):
            j = prev_idx[base + i]
            if j >= 0:
                nc = _hash_add(hkeys, hacc, mask, np.int64(j), np.float32(0.0), cand, nc)
    dmax = decay.shape[0]
    ne = 0
    for ci in range(nc):
        slot = cand[ci]
        j = hkeys[slot]
        a = np.float64(hacc[slot])
        if gated:
            g = _hash_get(gkeys, gacc, gmask, j)
            if g != 0.0:
                a *= bg_floor + (1.0 - bg_floor) * (1.0 - math.exp(-np.float64(g)))
            else:
                a *= bg_floor
        if stateful:
            last = state_tl[soff + j]
            v = a
            if last >= 0 and tick - last < dmax:
                v += state_v[soff + j] * decay[tick - last]
            state_v[soff + j] = v
            state_tl[soff + j] = tick
        else:
            v = a
        if v > thr:
            score[ne] = v
            sel[ne] = j
            ne += 1
    _hash_clear(hkeys, cand, nc)
    k = kmod[m]
    base = koff[m]
    nw = 0
    if ne <= k:
        for i in range(ne):
            row_idx[base + nw] = sel[i]
            row_val[base + nw] = score[i]
            nw += 1
    else:
        nw = _select_topk(score, sel, ne, k, tmp, tsel, row_idx, row_val, base)
    for i in range(nw):
        j = row_idx[base + i]
        if lif:
            row_val[base + i] = 1.0
            state_v[soff + j] = 0.0  # fire and reset
        else:
            # saturating rate r = x / (1 + x) of the gained drive x > 0
            xg = row_val[base + i] * rate_scale
            row_val[base + i] = xg / (np.float32(1.0) + xg)
    for i in range(nw, k):
        row_idx[base + i] = -1
        row_val[base + i] = 0.0
    return nw


@njit(cache=True)
def _table_size(n):
    size = 64
    while size < 2 * n:
        size *= 2
    return size


@njit(cache=True, parallel=True)
def cycle(tokens, tick0, code, syn, proj, tgt_order, tgt_start, koff, kmod, nhip, soff, decay,
          thr, flags, fparams, state_v, state_tl, prev_idx, prev_val, hip_keys, hip_vals, hip_n,
          out_idx, out_val, out_gate, out_recall, out_rtok):
    """Run the five-phase cycle over tokens (B, T) for every stream; see the module docs.

    ``syn`` (S, 2) float32 holds each synapse's target neuron and weight side by side.
    """
    B, T = tokens.shape
    ktot = koff[NMOD]
    kth = kmod[THAL]
    khip = kmod[HIP]
    H = hip_keys.shape[1]
    lif = flags[F_LIF] != 0
    thal_gating = flags[F_THAL_GATING] != 0
    hippocampus = flags[F_HIPPOCAMPUS] != 0
    bg_gating = flags[F_BG_GATING] != 0
    working_memory = flags[F_WORKING_MEMORY] != 0
    gain = fparams[FP_GATE_GAIN]
    bias = fparams[FP_GATE_BIAS]
    recall_thr = fparams[FP_RECALL_THR]
    bg_floor = fparams[FP_BG_FLOOR]
    rate_scale = fparams[FP_RATE_SCALE]
    # the largest candidate list of any module: all its incoming events plus its previous winners
    maxc = 0
    for m in range(NMOD):
        c = kmod[m]
        for q in range(tgt_start[m], tgt_start[m + 1]):
            p = tgt_order[q]
            c += kmod[proj[p, P_SRC]] * proj[p, P_F]
        if c > maxc:
            maxc = c
    size = _table_size(maxc)
    mask = size - 1
    for b in prange(B):
        hkeys = np.full(size, -1, np.int32)
        hacc = np.zeros(size, np.float32)
        gkeys = np.full(size, -1, np.int32)
        gacc = np.zeros(size, np.float32)
        gcand = np.empty(maxc, np.int32)
        member = np.full(nhip, -1, np.int32)
        cand = np.empty(maxc, np.int32)
        score = np.empty(maxc, np.float32)
        sel = np.empty(maxc, np.int32)
        tmp = np.empty(maxc + 1, np.float32)
        tsel = np.empty(maxc + 1, np.int32)
        sv = state_v[b]
        stl = state_tl[b]
        for t in range(T):
            tick = tick0 + t
            x = tokens[b, t]
            row_idx = out_idx[b, t]
            row_val = out_val[b, t]
            if t == 0:
                pv_idx = prev_idx[b]
                pv_val = prev_val[b]
            else:
                pv_idx = out_idx[b, t - 1]
                pv_val = out_val[b, t - 1]
            # ---- 1. sensation: the token's thalamic code, gated top-down by the PFC
            nc = 0
            if thal_gating:
                for q in range(tgt_start[THAL], tgt_start[THAL + 1]):
                    p = tgt_order[q]
                    if proj[p, P_DELAY] == 1:
                        nc = _accumulate(p, proj, pv_idx, pv_val, koff, kmod, syn, hkeys, hacc, mask, cand, nc)
                    else:
                        nc = _accumulate(p, proj, row_idx, row_val, koff, kmod, syn, hkeys, hacc, mask, cand, nc)
            gsum = 0.0
            bth = koff[THAL]
            for i in range(kth):
                n = code[x, i]
                g = 1.0
                if thal_gating:
                    td = _hash_get(hkeys, hacc, mask, n)
                    g = 1.0 / (1.0 + math.exp(-(gain * td + bias)))
                row_idx[bth + i] = n
                row_val[bth + i] = g
                gsum += g
            _hash_clear(hkeys, cand, nc)
            out_gate[b, t] = gsum / kth
            # clear the rows of the modules computed below (REC may stay empty)
            for i in range(koff[WERN], ktot):
                row_idx[i] = -1
                row_val[i] = 0.0
            # ---- 2. perception (Wernicke), 3. integration (hippocampus, PFC),
            # ---- 4. selection (basal ganglia), 5. action (Broca)
            for m in (WERN, HIP, PFC, BG, BROCA):
                if m == HIP and not hippocampus:
                    continue
                if m == BG and not bg_gating:
                    continue
                nc = 0
                ngc = 0
                gated = m == BROCA and bg_gating
                for q in range(tgt_start[m], tgt_start[m + 1]):
                    p = tgt_order[q]
                    if proj[p, P_SRC] == PFC and m == PFC and proj[p, P_DELAY] == 1 and not working_memory:
                        continue
                    if proj[p, P_DELAY] == 1:
                        ri, rv = pv_idx, pv_val
                    else:
                        ri, rv = row_idx, row_val
                    if proj[p, P_KIND] == 1:
                        if gated:
                            ngc = _accumulate(p, proj, ri, rv, koff, kmod, syn, gkeys, gacc, mask, gcand, ngc)
                    else:
                        nc = _accumulate(p, proj, ri, rv, koff, kmod, syn, hkeys, hacc, mask, cand, nc)
                so = soff[m]
                if m == PFC and not lif and not working_memory:
                    so = -1
                _finalize(m, nc, cand, hkeys, hacc, mask, koff, kmod, pv_idx, sv, stl, so,
                          decay[m], thr[m], lif, rate_scale, gated, gkeys, gacc, mask, bg_floor,
                          tick, score, sel, tmp, tsel, row_idx, row_val)
                if gated:
                    _hash_clear(gkeys, gcand, ngc)
                if m == HIP:
                    # recall with the current pattern (only earlier episodes are stored), then
                    # store the episode (hippocampal pattern of t-1 -> this token)
                    bh = koff[HIP]
                    best = -1
                    bo = 0
                    for i in range(khip):
                        j = row_idx[bh + i]
                        if j >= 0:
                            member[j] = t
                    nst = hip_n[b] if hip_n[b] < H else H
                    for e in range(nst):
                        o = 0
                        for i in range(khip):
                            kk = hip_keys[b, e, i]
                            if kk >= 0 and member[kk] == t:
                                o += 1
                        if o > bo:
                            bo = o
                            best = e
                    strength = bo / khip
                    br = koff[REC]
                    if best >= 0 and strength >= recall_thr:
                        rt = hip_vals[b, best]
                        for i in range(kth):
                            row_idx[br + i] = code[rt, i]
                            row_val[br + i] = strength
                        out_rtok[b, t] = rt
                        out_recall[b, t] = strength
                    else:
                        out_rtok[b, t] = -1
                        out_recall[b, t] = 0.0
                    if pv_idx[bh] >= 0:
                        slot = hip_n[b] % H
                        for i in range(khip):
                            hip_keys[b, slot, i] = pv_idx[bh + i]
                        hip_vals[b, slot] = x
                        hip_n[b] += 1
            if not hippocampus:
                out_rtok[b, t] = -1
                out_recall[b, t] = 0.0
        for i in range(ktot):
            prev_idx[b, i] = out_idx[b, T - 1, i]
            prev_val[b, i] = out_val[b, T - 1, i]


@njit(cache=True, parallel=True)
def eligibility(out_idx, out_val, prev_idx, prev_val, dopa, syn_tgt, proj, noff, koff, kmod,
                nsyn, nchunks):
    """Three-factor weight change sum_{b,t} dopa[b,t] * pre * post per synapse, and firing counts.

    ``pre`` is the source value at ``t - delay`` (the call's initial ``prev`` row for
    ``t - 1 < 0``), ``post`` the target's value at ``t`` (0 unless it won). Returns
    ``(dw (nsyn,), counts (ntot,))``.
    """
    B, T, ktot = out_idx.shape
    ntot = noff[NMOD]
    P = proj.shape[0]
    size = _table_size(ktot)
    mask = size - 1
    dw_loc = np.zeros((nchunks, nsyn), np.float32)
    cnt_loc = np.zeros((nchunks, ntot), np.float32)
    for c in prange(nchunks):
        hkeys = np.full(size, -1, np.int32)
        hval = np.zeros(size, np.float32)
        slots = np.empty(ktot, np.int32)
        dwc = dw_loc[c]
        cc = cnt_loc[c]
        b0 = c * B // nchunks
        b1 = (c + 1) * B // nchunks
        for b in range(b0, b1):
            for t in range(T):
                ri = out_idx[b, t]
                rv = out_val[b, t]
                # the winners of this token (flat neuron ids) -> their values
                ns = 0
                for m in range(NMOD - 1):
                    for i in range(koff[m], koff[m] + kmod[m]):
                        j = ri[i]
                        if j >= 0:
                            cc[noff[m] + j] += 1.0
                            ns = _hash_add(hkeys, hval, mask, noff[m] + j, rv[i], slots, ns)
                d = dopa[b, t]
                if d != 0.0:
                    if t == 0:
                        pi, pv = prev_idx[b], prev_val[b]
                    else:
                        pi, pv = out_idx[b, t - 1], out_val[b, t - 1]
                    for p in range(P):
                        src = proj[p, P_SRC]
                        off = proj[p, P_OFF]
                        fan = proj[p, P_F]
                        stride = proj[p, P_STRIDE]
                        nt = noff[proj[p, P_TGT]]
                        if proj[p, P_DELAY] == 1:
                            si, sv = pi, pv
                        else:
                            si, sv = ri, rv
                        for i in range(koff[src], koff[src] + kmod[src]):
                            j = si[i]
                            if j < 0:
                                continue
                            dv = d * sv[i]
                            if dv == 0.0:
                                continue
                            s0 = off + j * stride
                            for f in range(fan):
                                post = _hash_get(hkeys, hval, mask, nt + syn_tgt[s0 + f])
                                if post != 0.0:
                                    dwc[s0 + f] += dv * post
                _hash_clear(hkeys, slots, ns)
    dw = np.zeros(nsyn, np.float32)
    counts = np.zeros(ntot, np.float32)
    for c in range(nchunks):
        dw += dw_loc[c]
        counts += cnt_loc[c]
    return dw, counts


def num_threads() -> int:
    return int(numba.get_num_threads()) if AVAILABLE else 1
