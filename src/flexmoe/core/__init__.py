"""Single-device MoE math: settings, the expert layout, gates, routing, dispatch/combine, experts.

Nothing here touches a process group; `flexmoe.parallel` runs these pieces across ranks.
"""
