"""A float64 NumPy token recurrence (with per-document state resets), the independent reference of the
op tests, checked here against the closed form of lightning attention."""

import numpy as np


def recurrence_f64(q, k, v, decay, h0=None, segment_ids=None, do=None, dht=None):
    """Per row b and head h, with g = exp(-decay[h]) and keep_t = 0 where a document starts (segment id
    changes), else 1:  S_t = keep_t g S_{t-1} + k_t^T v_t,  o_t = q_t S_t,  S_{-1} = h0 (or 0).

    Returns (o [B, H, T, Dv], final state [B, H, Dk, Dv]) and, with ``do`` (and ``dht``, default 0),
    also the gradients of <o, do> + <S_T, dht> with respect to q, k, v, h0 (the recurrence's adjoint)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    g = np.exp(-np.asarray(decay, np.float64))[None, :, None, None]
    keep = np.ones((B, T))
    if segment_ids is not None:
        seg = np.asarray(segment_ids)
        keep[:, 1:] = seg[:, 1:] == seg[:, :-1]
    keep = keep[:, None, :, None, None]  # [B, 1, T, 1, 1]
    S = np.zeros((B, H, Dk, Dv)) if h0 is None else np.asarray(h0, np.float64).copy()
    states, o = [], np.zeros((B, H, T, Dv))
    for t in range(T):
        S = keep[:, :, t] * g * S + k[:, :, t, :, None] * v[:, :, t, None, :]
        states.append(S)
        o[:, :, t] = np.einsum("bhk,bhkv->bhv", q[:, :, t], S)
    if do is None:
        return o, S
    do = np.asarray(do, np.float64)
    G = np.zeros((B, H, Dk, Dv)) if dht is None else np.asarray(dht, np.float64).copy()  # d S_t
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    for t in range(T - 1, -1, -1):
        G = G + q[:, :, t, :, None] * do[:, :, t, None, :]
        dq[:, :, t] = np.einsum("bhkv,bhv->bhk", states[t], do[:, :, t])
        dk[:, :, t] = np.einsum("bhkv,bhv->bhk", G, v[:, :, t])
        dv[:, :, t] = np.einsum("bhkv,bhk->bhv", G, k[:, :, t])
        G = keep[:, :, t] * g * G
    return o, S, dq, dk, dv, G


def closed_form_f64(q, k, v, decay, h0, segment_ids):
    """o_t = sum_{j <= t, same document} g^(t-j) (q_t . k_j) v_j + [t in the first document] g^(t+1) q_t h0."""
    q, k, v, h0 = (np.asarray(a, np.float64) for a in (q, k, v, h0))
    B, H, T, _ = q.shape
    seg = np.asarray(segment_ids)
    lam = np.asarray(decay, np.float64)
    t = np.arange(T)
    o = np.zeros((B, H, T, v.shape[-1]))
    for b in range(B):
        same = (seg[b][:, None] == seg[b][None, :]) & (t[:, None] >= t[None, :])
        first = seg[b] == seg[b][0]
        for h in range(H):
            w = np.where(same, np.exp(-lam[h] * (t[:, None] - t[None, :])), 0.0)
            o[b, h] = (w * (q[b, h] @ k[b, h].T)) @ v[b, h]
            o[b, h] += (first * np.exp(-lam[h] * (t + 1)))[:, None] * (q[b, h] @ h0[b, h])
    return o


def test_recurrence_matches_closed_form_and_finite_differences():
    rng = np.random.default_rng(0)
    B, H, T, D = 2, 2, 9, 3
    q, k, v, do = (rng.standard_normal((B, H, T, D)) for _ in range(4))
    h0, dht = rng.standard_normal((B, H, D, D)), rng.standard_normal((B, H, D, D))
    decay = np.array([0.7, 0.05])
    seg = np.array([[0, 0, 0, 1, 1, 2, 2, 2, 2], [5] * T])
    o, S, dq, dk, dv, dh0 = recurrence_f64(q, k, v, decay, h0, seg, do, dht)
    np.testing.assert_allclose(o, closed_form_f64(q, k, v, decay, h0, seg), rtol=1e-12, atol=1e-12)
    # the adjoint against central differences of <o, do> + <S, dht>, at a few entries of each input

    def loss(q, k, v, h0):
        o, S = recurrence_f64(q, k, v, decay, h0, seg)
        return np.sum(o * do) + np.sum(S * dht)

    args = [q, k, v, h0]
    for i, grad in enumerate((dq, dk, dv, dh0)):
        for _ in range(3):
            idx = tuple(int(rng.integers(0, n)) for n in args[i].shape)
            up, dn = [a.copy() for a in args], [a.copy() for a in args]
            up[i][idx] += 1e-6
            dn[i][idx] -= 1e-6
            np.testing.assert_allclose((loss(*up) - loss(*dn)) / 2e-6, grad[idx], rtol=1e-6, atol=1e-8)
