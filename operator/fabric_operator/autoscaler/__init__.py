"""The autoscaler: pure decisions (window, policy) apart from the code that feeds them."""
