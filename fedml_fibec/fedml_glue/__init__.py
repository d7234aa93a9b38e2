"""The thin FedML layer both engines share: FedML's `args` from our config, the quiet MPI transport,
and the switches that keep FedML offline. Everything that imports FedML outside the two engines is here.
"""
