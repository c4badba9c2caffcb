"""What each model accepts and costs: the catalog, pre-flight checks, prices, budgets."""
