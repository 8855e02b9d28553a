"""Integrations of flexmoe into host libraries, one subpackage per host (optional extras).

They adapt the host to flexmoe, never flexmoe's core to the host (DESIGN section 11).
"""
