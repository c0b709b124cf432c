#!/usr/bin/perl
# Perl Net::Stomp (Debian libnet-stomp-perl) against stompd: connect (with and without login),
# send, subscribe, ack, transaction, as STOMP 1.0 (the client's native level) and 1.2 (by
# sending accept-version). Prints TAP lines (`ok - NAME` / `not ok - NAME`) that ../run.sh
# counts. Every receive is bounded (receive_frame timeout).
use strict;
use warnings;
use Net::Stomp;

my $HOST      = $ENV{STOMPD_HOST} || '127.0.0.1';
my $PORT      = $ENV{STOMPD_PORT} || 61613;
my $AUTH_PORT = $ENV{STOMPD_AUTH_PORT} || '';
my $USER      = $ENV{STOMPD_USER} || 'interop';
my $PASSCODE  = $ENV{STOMPD_PASSCODE} // '';
my $FULL      = ($ENV{STOMPD_FLAVOR} || 'stompd') eq 'stompd';
my $WAIT_S    = 5;
my $failed    = 0;
my $serial    = 0;

$| = 1;

sub check {
    my ($name, $code) = @_;
    my $ok = eval {
        local $SIG{ALRM} = sub { die "test exceeded 30 s\n" };
        alarm 30;
        $code->();
        alarm 0;
        1;
    };
    alarm 0;
    if ($ok) {
        print "ok - perl: $name\n";
    } else {
        $failed++;
        print "not ok - perl: $name\n";
        my $error = $@ || 'unknown error';
        $error =~ s/^/#   /mg;
        print $error, "\n";
    }
}

sub fresh {
    my ($kind, $label) = @_;
    $serial++;
    return sprintf('/%s/interop-pl-%s-%d-%d-%d', $kind, $label, $$, time, $serial);
}

sub client {
    my (%opts) = @_;
    my $stomp = Net::Stomp->new({
        hostname => $HOST,
        port => $opts{port} || $PORT,
        timeout => $WAIT_S,
        receipt_timeout => $WAIT_S,
        initial_reconnect_attempts => 1,
        reconnect_attempts => 1,
    });
    my %headers;
    $headers{'accept-version'} = $opts{version} if $opts{version} ne '1.0';
    $headers{host} = 'localhost' if $opts{version} ne '1.0';
    $headers{login} = $opts{login} if defined $opts{login};
    $headers{passcode} = $opts{passcode} if defined $opts{passcode};
    my $frame = $stomp->connect(\%headers);
    return ($stomp, $frame);
}

sub connected {
    my ($version) = @_;
    my ($stomp, $frame) = client(version => $version);
    die "no CONNECTED: " . ($frame ? $frame->command : 'nothing') . "\n"
        unless $frame && $frame->command eq 'CONNECTED';
    return $stomp;
}

sub next_frame {
    my ($stomp, $what) = @_;
    my $frame = $stomp->receive_frame({ timeout => $WAIT_S });
    die "no $what within $WAIT_S s\n" unless $frame;
    return $frame;
}

sub next_message {
    my ($stomp) = @_;
    my $frame = next_frame($stomp, 'MESSAGE');
    die 'expected MESSAGE, got ' . $frame->command . "\n" unless $frame->command eq 'MESSAGE';
    return $frame;
}

sub receipt {
    my ($stomp, $id) = @_;
    my $frame = next_frame($stomp, "RECEIPT $id");
    die 'expected RECEIPT ' . $id . ', got ' . $frame->command . ' ' . ($frame->headers->{'receipt-id'} // '') . "\n"
        unless $frame->command eq 'RECEIPT' && $frame->headers->{'receipt-id'} eq $id;
}

sub subscribe {
    my ($stomp, $destination, $id, $ack) = @_;
    my $receipt = "sub-$id";
    $stomp->subscribe({ destination => $destination, id => $id, ack => $ack || 'auto', receipt => $receipt });
    receipt($stomp, $receipt);
}

sub ack {
    my ($stomp, $version, $frame, %extra) = @_;
    my %headers = (frame => $frame, %extra);
    $headers{subscription} = $frame->headers->{subscription} if $version ne '1.0';
    $headers{id} = $frame->headers->{ack} if $version eq '1.2';
    $stomp->ack(\%headers);
}

sub is_equal {
    my ($got, $want, $what) = @_;
    $got //= '(undef)';
    die "$what: wanted '$want', got '$got'\n" unless $got eq $want;
}

for my $version ('1.0', '1.2') {
    check("$version connect (spec: Connecting)", sub {
        my $stomp = connected($version);
        $stomp->disconnect;
    });

    check("$version send, subscribe, receive on a topic (spec: SEND, SUBSCRIBE, MESSAGE)", sub {
        my $stomp = connected($version);
        my $dest = fresh('topic', 'basic');
        subscribe($stomp, $dest, 'pl-1');
        $stomp->send({ destination => $dest, body => "hello from perl $version", 'x-lang' => 'perl' });
        my $frame = next_message($stomp);
        is_equal($frame->body, "hello from perl $version", 'body');
        is_equal($frame->headers->{destination}, $dest, 'destination');
        is_equal($frame->headers->{'x-lang'}, 'perl', 'user header') if $FULL;
        $stomp->disconnect;
    });

    check("$version send_with_receipt (spec: RECEIPT)", sub {
        my $stomp = connected($version);
        $stomp->send_with_receipt({ destination => fresh('topic', 'receipt'), body => 'x' })
            or die "send_with_receipt got no matching RECEIPT\n";
        $stomp->disconnect;
    });

    unless ($FULL) {
        print "# SKIP perl: $version queue, ack, transaction (needs the full broker)\n";
        next;
    }

    check("$version client ack: unacked is redelivered, acked is gone (spec: ACK)", sub {
        my $dest = fresh('queue', 'ack');
        my $stomp = connected($version);
        $stomp->send_with_receipt({ destination => $dest, body => 'ack me' }) or die "no receipt\n";
        subscribe($stomp, $dest, 'pl-2', 'client');
        is_equal(next_message($stomp)->body, 'ack me', 'first delivery');
        $stomp->disconnect;

        my $again = connected($version);
        subscribe($again, $dest, 'pl-3', 'client');
        my $frame = next_message($again);
        is_equal($frame->body, 'ack me', 'redelivery');
        ack($again, $version, $frame, receipt => 'acked');
        receipt($again, 'acked');
        $again->disconnect;

        my $last = connected($version);
        subscribe($last, $dest, 'pl-4', 'client');
        $last->send({ destination => $dest, body => 'sentinel' });
        is_equal(next_message($last)->body, 'sentinel', 'first message after the ACK');
        $last->disconnect;
    });

    check("$version transactions: commit delivers, abort discards (spec: BEGIN, COMMIT, ABORT)", sub {
        my $dest = fresh('queue', 'tx');
        my $stomp = connected($version);
        subscribe($stomp, $dest, 'pl-5');
        $stomp->send_frame(Net::Stomp::Frame->new({ command => 'BEGIN', headers => { transaction => 'a' } }));
        $stomp->send({ destination => $dest, body => 'aborted', transaction => 'a' });
        $stomp->send_frame(Net::Stomp::Frame->new({ command => 'ABORT', headers => { transaction => 'a' } }));
        $stomp->send_transactional({ destination => $dest, body => 'committed' })
            or die "send_transactional got no RECEIPT\n";
        is_equal(next_message($stomp)->body, 'committed', 'the committed message (the aborted one never comes)');
        $stomp->send({ destination => $dest, body => 'sentinel' });
        is_equal(next_message($stomp)->body, 'sentinel', 'nothing between');
        $stomp->disconnect;
    });

    if ($AUTH_PORT) {
        check("$version login accepted, wrong passcode refused (spec: CONNECT, ERROR)", sub {
            my ($good, $frame) = client(version => $version, port => $AUTH_PORT, login => $USER, passcode => $PASSCODE);
            is_equal($frame && $frame->command, 'CONNECTED', 'answer to the right passcode');
            $good->disconnect;
            my ($bad, $refusal) = client(version => $version, port => $AUTH_PORT, login => $USER, passcode => "$PASSCODE-wrong");
            is_equal($refusal && $refusal->command, 'ERROR', 'answer to a wrong passcode');
            die "ERROR without a message header\n" unless $refusal->headers->{message};
        });
    } else {
        print "# SKIP perl: $version login (no auth broker)\n";
    }
}

print "# Net::Stomp $Net::Stomp::VERSION: $failed failed\n";
exit($failed ? 1 : 0);
