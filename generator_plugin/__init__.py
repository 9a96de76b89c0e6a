"""Generation: a diffusers decoder D(A, c) with an attribute IP-Adapter, personalization and composition."""
