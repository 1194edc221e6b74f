"""Group membership, router side: IGMPv1/v2/v3 and MLDv1/v2 queriers, sans-IO."""
