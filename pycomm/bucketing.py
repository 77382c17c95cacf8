"""How gradients are packed into fused buckets, shared by pycomm.train and pycomm.torch."""


def plan_buckets(nbytes: list, limit: int, groups: list = None) -> list:
    """Splits parameters 0..n-1 into buckets of at most `limit` bytes (a larger parameter gets one
    of its own), filled in reverse order: the order backward produces gradients in. Parameters of
    different `groups` (e.g. dtypes) never share a bucket. Returns lists of indices, in the order
    the buckets fill; every rank computes the same plan."""
    groups = groups if groups is not None else [None] * len(nbytes)
    buckets, filling, filled = [], {}, {}  # per group: the bucket being filled, its bytes
    for i in reversed(range(len(nbytes))):
        g = groups[i]
        members = filling.setdefault(g, [])
        if members and filled[g] + nbytes[i] > limit:
            buckets.append(members)
            members = filling[g] = []
        filled[g] = (filled[g] if members else 0) + nbytes[i]
        members.append(i)
    return buckets + [members for members in filling.values() if members]
