#!/usr/bin/perl
# FastAGI app written with Asterisk::AGI (Debian libasterisk-agi-perl) under Net::Server.
# Usage: perl_app.pl PORT SCRIPT...  (each SCRIPT a path, without query, it answers).
package InteropApp;
use strict;
use warnings;
use base 'Net::Server::Fork';
use Asterisk::AGI;

my ($port, @scripts) = @ARGV;
my %known = map { $_ => 1 } @scripts;

sub process_request {
    my $agi = Asterisk::AGI->new;
    my %input = $agi->ReadParse();
    my ($path) = split /\?/, ($input{network_script} // '');
    return unless $known{$path // ''};
    my $seen = join ';', map { "$_->[0]=" . ($input{$_->[1]} // '-') }
        ([script => 'network_script'], [request => 'request'], [arg1 => 'arg_1'], [arg2 => 'arg_2'],
         [fwd => 'x_fwd_for']);
    $agi->answer();
    $agi->get_variable('CHANNEL');
    $agi->set_variable('AGI_SEEN', $seen);
    $agi->verbose('hello', 1);
    $agi->exec('Wait', '0.2');
}

$| = 1;
print STDERR "";
InteropApp->run(port => "127.0.0.1:$port", log_level => 2,
                background => 0, setsid => 0);
